#!/usr/bin/env python3
"""diffusers reference for lorakit's sampler: seconds per generated image on CPU, fp32.

What it measures: the mean wall time of one StableDiffusionXLPipeline call producing one PIL image (initial
noise, `--steps` Euler steps with classifier-free guidance, i.e. one UNet call on the batched cond + uncond
pair per step, then the VAE decode and the conversion to an 8-bit RGB image). This mirrors lorakit's
`pipeline::generate` (`crates/lora-sdxl/src/pipeline.rs`: cfg != 1 runs cond and uncond in one batched UNet
call per step; `decode_images` decodes and converts to RgbImage) with the `euler` sampler.

Text encoding is not timed: the prompt / negative-prompt embeddings (cat of both text encoders' penultimate
hidden states, TE2's pooled projection) are computed once from fixed token ids (no tokenizer files offline;
the cost does not depend on the ids) and passed as prompt_embeds / pooled_prompt_embeds / negative_* (so
tokenizers are None and force_zeros_for_empty_prompt does not apply). The negative prompt is an empty
sequence, BOS EOS + padding. The scheduler is EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1), SDXL's shipped configuration.

The model is the SDXL-architecture single-file checkpoint (lorakit `SdxlConfig::tiny()` structure), converted
with diffusers' single-file converters and loaded with strict=True by the helpers in train_step_diffusers.py
(same folder).

Usage:
    sample_diffusers.py CHECKPOINT IMAGES THREADS [--steps 20] [--width 256] [--height 256] [--cfg 7]

Prints one JSON line to stdout: {"seconds_per_image": ..., "images": N, "threads": T}. One warm-up image is
generated first and not timed; image i of the timed run uses torch.Generator().manual_seed(i).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.dont_write_bytecode = True  # importing the sibling helper must not leave a __pycache__ in benches/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step_diffusers as common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("images", type=int)
    ap.add_argument("threads", type=int)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--cfg", type=float, default=7.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import transformers
    verbosity = transformers.logging.get_verbosity()
    # importing the pipeline pulls in image processors that note torchvision is missing (irrelevant here)
    transformers.logging.set_verbosity_error()
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    transformers.logging.set_verbosity(verbosity)

    sd = common.load_checkpoint(a.checkpoint)
    unet = common.load_unet(sd).eval().requires_grad_(False)
    vae = common.load_vae(sd).eval().requires_grad_(False)
    te1, te2 = common.load_text_encoders(sd)
    del sd

    ids1, ids2 = common.token_ids([9])  # prompt: BOS, 9 ids, EOS, padding
    nids1, nids2 = common.token_ids([0])  # negative prompt: BOS EOS, padding
    with torch.no_grad():
        ctx, pooled = common.encode(te1, te2, ids1, ids2)
        nctx, npooled = common.encode(te1, te2, nids1, nids2)

    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def image(seed):
        out = pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=nctx,
                   negative_pooled_prompt_embeds=npooled, num_inference_steps=a.steps, guidance_scale=a.cfg,
                   width=a.width, height=a.height, generator=torch.Generator().manual_seed(seed),
                   output_type="pil")
        img = out.images[0]
        assert img.size == (a.width, a.height), img.size
        return img

    image(1_000_000)  # warm-up
    t0 = time.perf_counter()
    for i in range(a.images):
        image(i)
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds_per_image": round(dt / a.images, 6), "images": a.images, "threads": a.threads}))


if __name__ == "__main__":
    main()
