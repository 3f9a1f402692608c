#!/usr/bin/env python3
"""diffusers + peft side of scripts/gpu-check.sh: a well-tuned SDXL LoRA training step and SDXL sampling.

Training (`train RES BATCH CKPT STEPS`): the full-size SDXL base UNet (diffusers' SDXL config, random init, bf16),
peft LoRA rank 16 / conv rank 8 on kohya's targets (train_step_diffusers.py's `add_lora`, the same modules lorakit
trains), SDPA attention (diffusers' default AttnProcessor2_0), cached latents and text embeddings as tensors
already on the GPU, DDPM noise, MSE, clip_grad_norm_ 1.0, torch.optim.AdamW(fused=True), zero_grad(set_to_none),
gradient checkpointing on or off. 3 warm-up steps, then STEPS timed steps (torch.cuda.synchronize around them);
peak memory = torch.cuda.max_memory_allocated over the timed steps.

Sampling (`sample RES STEPS`): StableDiffusionXLPipeline with that UNet and a full-size VAE (random, fp16),
Euler, CFG 7, prompt embeddings given (no tokenizer or text encoders: nothing can be downloaded there); one
warm-up image, then one timed.

`--dry-run` uses train_step_diffusers.py's tiny config on the CPU in fp32 (to test this script here).
Prints one JSON object per run on stdout.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_step_diffusers as ref  # noqa: E402


def sdxl_unet_config():
    """diffusers' SDXL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32, upcast_attention=False)


def sdxl_vae_config():
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.13025, sample_size=1024)


def setup(dry):
    from diffusers import UNet2DConditionModel
    dev = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    cfg = ref.unet_config() if dry else sdxl_unet_config()
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**cfg).to(dtype)
    ctx_dim = cfg["cross_attention_dim"]
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * 256
    return unet, dev, dtype, ctx_dim, pooled_dim


def peak_mib(dev):
    return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def train(a):
    from diffusers import DDPMScheduler
    unet, dev, dtype, ctx_dim, pooled_dim = setup(a.dry_run)
    targets, params = ref.add_lora(unet, 16, 8)
    if a.ckpt == "on":
        unet.enable_gradient_checkpointing()
    unet.train()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=dev.type == "cuda")
    b, lat = a.batch, a.res // 8
    moments = torch.randn(b, 8, lat, lat, device=dev)  # cached VAE mean / logvar, on the GPU
    moments[:, 4:] = moments[:, 4:] * 0.1 - 4.0
    context = torch.randn(b, 77, ctx_dim, device=dev, dtype=dtype)  # cached text embeddings
    pooled = torch.randn(b, pooled_dim, device=dev, dtype=dtype)
    time_ids = torch.tensor([[a.res, a.res, 0, 0, a.res, a.res]], device=dev, dtype=dtype).repeat(b, 1)

    def step():
        return ref.lora_step(unet, sched, opt, params, moments, context, pooled, time_ids, dtype)

    for _ in range(3):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    sync(dev)
    dt = (time.perf_counter() - t0) / a.steps
    assert torch.isfinite(loss), loss
    tflop = {512: 3.2, 768: 7.5, 1024: 14.3}.get(a.res)
    return {"side": "diffusers+peft", "res": a.res, "batch": b, "gradient_checkpointing": a.ckpt == "on",
            "s_per_step": dt, "samples_per_s": b / dt, "peak_allocated_mib": peak_mib(dev),
            "model_tflop_per_s": tflop * b / dt if tflop else None, "lora_modules": len(targets)}


def sample(a):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    unet, dev, dtype, ctx_dim, pooled_dim = setup(a.dry_run)
    sdtype = torch.float32 if a.dry_run else torch.float16
    with torch.device(dev):
        vae = AutoencoderKL(**(ref.vae_config() if a.dry_run else sdxl_vae_config())).to(sdtype)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet.to(sdtype), scheduler=sched)
    emb = dict(prompt_embeds=torch.randn(1, 77, ctx_dim, device=dev, dtype=sdtype),
               negative_prompt_embeds=torch.randn(1, 77, ctx_dim, device=dev, dtype=sdtype),
               pooled_prompt_embeds=torch.randn(1, pooled_dim, device=dev, dtype=sdtype),
               negative_pooled_prompt_embeds=torch.randn(1, pooled_dim, device=dev, dtype=sdtype))

    def image():
        return pipe(height=a.res, width=a.res, num_inference_steps=a.steps, guidance_scale=7.0,
                    output_type="np", **emb).images

    image()
    sync(dev)
    t0 = time.perf_counter()
    image()
    sync(dev)
    return {"side": "diffusers", "res": a.res, "steps": a.steps, "s_per_image": time.perf_counter() - t0,
            "dtype": str(sdtype)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("train")
    for name in ("res", "batch"):
        t.add_argument(name, type=int)
    t.add_argument("ckpt", choices=["on", "off"])
    t.add_argument("steps", type=int)
    s = sub.add_parser("sample")
    s.add_argument("res", type=int)
    s.add_argument("steps", type=int)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(json.dumps(train(a) if a.mode == "train" else sample(a)), flush=True)


if __name__ == "__main__":
    main()
