#!/usr/bin/env python3
"""diffusers side of benches/sdxl_model.rs: UNet forward time for a tiny config.

Usage: unet_forward.py CONFIG.json CHECKPOINT.safetensors IO.safetensors ITERS THREADS -> prints ms/forward
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint


def main():
    cfg_path, ckpt_path, io_path, iters, threads = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    cfg = json.load(open(cfg_path))["unet"]
    unet = UNet2DConditionModel(**cfg).eval()
    sd = {k: v.float() for k, v in load_file(ckpt_path).items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg))
    io = load_file(io_path)
    ctx = torch.cat([io["te1_hidden"], io["te2_hidden"]], -1)
    kw = dict(encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": io["te2_pooled"], "time_ids": io["time_ids"]})
    with torch.no_grad():
        for _ in range(3):
            unet(io["latents"], io["timesteps"], **kw)
        t = time.perf_counter()
        for _ in range(int(iters)):
            unet(io["latents"], io["timesteps"], **kw)
        dt = time.perf_counter() - t
    print(f"{dt / int(iters) * 1000:.3f}")


if __name__ == "__main__":
    main()
