#!/usr/bin/env python3
"""diffusers/peft reference for lorakit's training step: seconds per LoRA training step on CPU, fp32.

What it measures: the mean wall time of one optimizer step of an SDXL UNet LoRA, the way lorakit's trainer
(`crates/lora-sdxl/src/train.rs`, `micro_step` + the step loop) runs it with cached latents, frozen text
encoders, batch B and no gradient accumulation:

  1. latents: a sample from cached VAE moments, (mean + exp(logvar / 2) * randn) * 0.13025, [B, 4, res/8, res/8]
     (the moments are random tensors kept in memory, as lorakit keeps them after the first epoch);
  2. text conditioning under no_grad with both text encoders on B fixed token sequences (BOS, a few ids, EOS,
     padded to 77 with EOS for CLIP-L and 0 for OpenCLIP bigG): context = cat(TE1 penultimate hidden state,
     TE2 penultimate hidden state) -> [B, 77, 2048 in SDXL]; pooled = TE2 text_embeds; time_ids
     [res, res, 0, 0, res, res];
  3. noise = randn, timesteps uniform in [0, 1000), noisy = DDPM add_noise (scaled_linear 0.00085..0.012),
     eps prediction, MSE (mean) loss, backward;
  4. clip_grad_norm_(LoRA params, 1.0), torch.optim.AdamW(lr 1e-4, weight_decay 0.01), zero_grad(set_to_none).

LoRA: peft on the diffusers UNet (`unet.add_adapter(LoraConfig)`), lora_alpha = rank (scale 1), default init,
on kohya's SDXL targets (lorakit `targets::unet_targets`): every nn.Linear inside each Transformer2DModel
(proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2) at `--rank`; with
`--conv-rank` > 0 also every ResnetBlock2D's conv1/conv2 (3x3: conv rank), conv_shortcut (1x1: linear rank),
time_emb_proj (Linear: linear rank) and the down/up-sampler convs (3x3: conv rank), via peft rank_pattern /
alpha_pattern. The text encoders and all base weights are frozen.

The checkpoint is an SDXL-architecture single file (LDM/sgm layout) with lorakit's `SdxlConfig::tiny()`
structure (see the CONFIG constants below); it is converted with diffusers' single-file converters and loaded
with strict=True.

Usage:
    train_step_diffusers.py CHECKPOINT STEPS THREADS [--batch 2] [--res 256] [--rank 8] [--conv-rank 4]

Prints one JSON line to stdout, e.g.
    {"seconds_per_step": 0.123, "steps": 20, "lora_modules": 258, "lora_params": 123456, "threads": 2}
and the LoRA module / parameter counts to stderr. Three warm-up steps are run and not timed.
"""
import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# --- lorakit SdxlConfig::tiny() expressed as diffusers / transformers configs ----------------------------------
TOKEN_BOS, TOKEN_EOS, VOCAB = 49406, 49407, 49408
UNET_CHANNELS = (32, 64, 128)  # model_channels 32, channel_mult [1, 2, 4]
UNET_DEPTH = (0, 1, 2)  # transformer depth per level; the middle block takes the last (2)
TE1 = dict(hidden=32, intermediate=64, layers=3)
TE2 = dict(hidden=32, intermediate=64, layers=3, proj=32)
VAE_CHANNELS = (32, 32, 32, 32)
VAE_LAYERS = 1
SCALING_FACTOR = 0.13025


def heads_for(width):
    """SDXL's rule: 64-channel heads (one head below 64 channels)."""
    return max(1, width // 64)


def unet_config():
    ch, depth = UNET_CHANNELS, UNET_DEPTH
    return dict(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=list(ch), layers_per_block=2,
        down_block_types=["DownBlock2D" if d == 0 else "CrossAttnDownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in reversed(depth)],
        # DownBlock2D / UpBlock2D ignore their entry (0); the middle block uses the last one (2)
        transformer_layers_per_block=list(depth),
        # diffusers' legacy name: SDXL's [5, 10, 20] are head *counts*
        attention_head_dim=[heads_for(c) for c in ch],
        cross_attention_dim=TE1["hidden"] + TE2["hidden"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=TE2["proj"] + 6 * 256, norm_num_groups=32, upcast_attention=False)


def vae_config():
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=list(VAE_CHANNELS),
                layers_per_block=VAE_LAYERS, norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * len(VAE_CHANNELS),
                up_block_types=["UpDecoderBlock2D"] * len(VAE_CHANNELS), scaling_factor=SCALING_FACTOR)


def te_configs():
    from transformers import CLIPTextConfig
    te1 = CLIPTextConfig(vocab_size=VOCAB, hidden_size=TE1["hidden"], intermediate_size=TE1["intermediate"],
                         num_hidden_layers=TE1["layers"], num_attention_heads=heads_for(TE1["hidden"]),
                         max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=TOKEN_BOS, eos_token_id=TOKEN_EOS, pad_token_id=TOKEN_EOS)
    te2 = CLIPTextConfig(vocab_size=VOCAB, hidden_size=TE2["hidden"], intermediate_size=TE2["intermediate"],
                         num_hidden_layers=TE2["layers"], num_attention_heads=heads_for(TE2["hidden"]),
                         max_position_embeddings=77, hidden_act="gelu", projection_dim=TE2["proj"],
                         bos_token_id=TOKEN_BOS, eos_token_id=TOKEN_EOS, pad_token_id=0)
    return te1, te2


def load_checkpoint(path):
    return {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(path).items()}


def load_unet(sd):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = unet_config()
    unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, cfg), strict=True)
    return unet


def load_vae(sd):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    cfg = vae_config()
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, cfg), strict=True)
    return vae


def load_text_encoders(sd):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    c1, c2 = te_configs()
    te1 = CLIPTextModel(c1)
    d1 = convert_ldm_clip_checkpoint(sd, "conditioner.embedders.0.transformer.")
    # single files name CLIP-L `text_model.*`; transformers 5's CLIPTextModel has no `text_model` level
    own = te1.state_dict()
    if not any(k.startswith("text_model.") for k in own):
        d1 = {k.removeprefix("text_model."): v for k, v in d1.items()}
    # position_ids is a non-persistent buffer (arange(77)) in transformers 5
    pos = [k for k in d1 if k.endswith("embeddings.position_ids") and k not in own]
    for k in pos:
        assert torch.equal(d1.pop(k).flatten(), torch.arange(77)), k
    te1.load_state_dict(d1, strict=True)
    te2 = CLIPTextModelWithProjection(c2)
    d2 = convert_open_clip_checkpoint(te2, sd, prefix="conditioner.embedders.1.model.")
    te2.load_state_dict(d2, strict=True)
    return te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)


def token_ids(lengths):
    """Fixed token sequences (no tokenizer offline): BOS, n ids, EOS, padded to 77 (EOS for TE1, 0 for TE2)."""
    b = len(lengths)
    ids1 = torch.full((b, 77), TOKEN_EOS, dtype=torch.long)
    ids2 = torch.zeros((b, 77), dtype=torch.long)
    for i, n in enumerate(lengths):
        body = 320 + (torch.arange(n) * 37 + 11 * i) % 40000
        for ids in (ids1, ids2):
            ids[i, 0] = TOKEN_BOS
            ids[i, 1:1 + n] = body
            ids[i, 1 + n] = TOKEN_EOS
    return ids1, ids2


def encode(te1, te2, ids1, ids2):
    """SDXL conditioning: context = cat(penultimate hidden states), pooled = TE2 projection of the EOS state."""
    o1 = te1(ids1, output_hidden_states=True)
    o2 = te2(ids2, output_hidden_states=True)
    return torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1), o2.text_embeds


def lora_targets(unet, conv_rank):
    """kohya's SDXL UNet targets as {diffusers module name: kind}, kind in linear / conv1x1 / conv3x3."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    out = {}
    for name, mod in unet.named_modules():
        wanted = isinstance(mod, Transformer2DModel) or (
            conv_rank > 0 and isinstance(mod, (ResnetBlock2D, Downsample2D, Upsample2D)))
        if not wanted:
            continue
        for sub, m in mod.named_modules():
            if isinstance(m, torch.nn.Linear):
                out[f"{name}.{sub}"] = "linear"
            elif isinstance(m, torch.nn.Conv2d):
                out[f"{name}.{sub}"] = "conv1x1" if tuple(m.kernel_size) == (1, 1) else "conv3x3"
    return out


def add_lora(unet, rank, conv_rank):
    from peft import LoraConfig
    targets = lora_targets(unet, conv_rank)
    # peft matches pattern keys with re.match(rf"(.*\.)?({key})$", name): escaped full names select one module
    conv = {re.escape(n): conv_rank for n, k in targets.items() if k == "conv3x3"}
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(targets), rank_pattern=dict(conv),
                     alpha_pattern=dict(conv), lora_dropout=0.0, bias="none")
    unet.requires_grad_(False)
    unet.add_adapter(cfg)
    lora_a = [n for n, _ in unet.named_modules() if n.endswith(".lora_A.default")]
    assert len(lora_a) == len(targets), (len(lora_a), len(targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    return targets, params


def lora_step(unet, sched, opt, params, moments, context, pooled, time_ids, dtype=torch.float32):
    """One optimizer step from cached VAE moments and text conditioning: sample x0, DDPM noise at uniform
    timesteps, ε-MSE, backward, clip to norm 1, AdamW, zero_grad(set_to_none)."""
    with torch.no_grad():
        mean, logvar = moments.chunk(2, 1)
        x0 = (mean + (logvar * 0.5).exp() * torch.randn_like(mean)) * SCALING_FACTOR
    noise = torch.randn_like(x0)
    ts = torch.randint(0, 1000, (x0.shape[0],), device=x0.device)
    noisy = sched.add_noise(x0, noise, ts).to(dtype)
    pred = unet(noisy, ts, encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("steps", type=int)
    ap.add_argument("threads", type=int)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--conv-rank", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from diffusers import DDPMScheduler

    sd = load_checkpoint(a.checkpoint)
    unet = load_unet(sd)
    te1, te2 = load_text_encoders(sd)
    del sd
    targets, params = add_lora(unet, a.rank, a.conv_rank)
    n_params = sum(p.numel() for p in params)
    kinds = {k: sum(1 for v in targets.values() if v == k) for k in ("linear", "conv1x1", "conv3x3")}
    print(f"lora modules: {len(targets)} ({kinds}), lora params: {n_params}", file=sys.stderr)
    unet.train()

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    b, lat = a.batch, a.res // 8
    moments = torch.randn(b, 8, lat, lat)  # cached VAE mean / logvar, in memory
    moments[:, 4:] = moments[:, 4:] * 0.1 - 4.0
    ids1, ids2 = token_ids([5 + 7 * i for i in range(b)])
    time_ids = torch.tensor([[a.res, a.res, 0, 0, a.res, a.res]], dtype=torch.float32).repeat(b, 1)

    def step():
        with torch.no_grad():
            context, pooled = encode(te1, te2, ids1, ids2)
        return lora_step(unet, sched, opt, params, moments, context, pooled, time_ids)

    for _ in range(3):
        loss = step()
    assert torch.isfinite(loss), loss
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    dt = time.perf_counter() - t0
    assert torch.isfinite(loss), loss
    print(json.dumps({"seconds_per_step": round(dt / a.steps, 6), "steps": a.steps, "lora_modules": len(targets),
                      "lora_params": n_params, "threads": a.threads}))


if __name__ == "__main__":
    main()
