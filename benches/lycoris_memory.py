#!/usr/bin/env python3
"""LyCORIS' own memory and step time on the full-size SDXL UNet, CPU (issue 29, deliverable 3: the reference run).

What it measures: for each network, in a fresh child process (so peaks do not mix), a `lycoris-lora` network
(`create_lycoris` + `apply_to`) on diffusers' `UNet2DConditionModel` built from SDXL base 1.0's UNet config
(random weights, ~2.57 G parameters), and two training steps:

  - base weights in bf16, frozen (built directly in bf16: `torch.set_default_dtype(torch.bfloat16)` while the
    UNet is constructed, so there is no fp32 copy); the LyCORIS parameters in fp32, as LyCORIS creates them;
  - UNet only: random context [1, 77, 2048], added conditions `text_embeds` [1, 1280] and `time_ids` [1, 6]
    (bf16); batch 1 at 256x256 (latents [1, 4, 32, 32]);
  - noise = randn, timesteps uniform in [0, 1000), DDPM add_noise (scaled_linear 0.00085..0.012), eps
    prediction, MSE loss in fp32, backward, torch AdamW (lr 1e-4) over the LyCORIS parameters,
    zero_grad(set_to_none=True); the forward under `torch.autocast("cpu", torch.bfloat16)` as kohya's
    sd-scripts runs LyCORIS with `--mixed_precision bf16` (`--no-autocast` turns it off);
  - no gradient checkpointing (lorakit's default on the CPU); `torch.set_num_threads(--threads)` (default 2).

LyCORIS' defaults otherwise: the `full` preset (the UNet's Transformer2DModel, ResnetBlock2D, Downsample2D and
Upsample2D blocks, plus conv_in, conv_out and time_embedding.linear_1/2 by name; 4.x also matches the
`TimestepEmbedding` class, so add_embedding too), no bypass mode (each wrapped layer rebuilds its ΔW per forward
and runs `op(x, W' - W)` beside the base layer; `--bypass` switches bypass_mode on).

Networks (`--networks`, comma separated; all at linear_dim 4 / linear_alpha 4, conv_dim 2 / conv_alpha 2):
  lora       algo "lora" (LoCon)
  loha       algo "loha"
  lokr       algo "lokr", factor 8
  lora_dora  algo "lora", dora_wd=True (LyCORIS' default wd_on_output=True)
  lokr_dora  algo "lokr", factor 8, dora_wd=True

Figures per network (resident memory of the child process, GiB = 2**30 bytes):
  peak_rss_gib      ru_maxrss over the whole child run (model construction included)
  before_steps_gib  VmRSS right before the first step (UNet + network + inputs + optimizer built)
  steps_peak_gib    VmHWM over the training steps alone (reset by writing 5 to /proc/self/clear_refs first)
  step1_peak_gib    VmHWM after step 1 (same reset)
  step_s            seconds of each step (forward, backward, optimizer step, zero_grad)
  load1             the 1-minute load average before and after the steps (timings are contended above ~1.5
                    on a 2-core machine)
A child the kernel kills (OOM) is reported as "killed (signal N)"; the parent goes on with the next network.

Run (from the repository root; lycoris-lora installed with `pip install --no-deps --target DIR lycoris-lora==V
einops toml tqdm`, never into .venv itself):

    PYTHONPATH=/work/pylib-lyco-3.4.0 .venv/bin/python benches/lycoris_memory.py --networks lora,loha,lokr,lora_dora,lokr_dora --steps 2

Prints one JSON line per network to stdout (then extra fields: module counts, parameter count, load, losses),
e.g. this machine (2 cores, 24 GiB, loaded by other jobs), lycoris-lora 3.4.0:
    {"network": "lora", "lycoris": "3.4.0", "peak_rss_gib": 16.449, "steps_peak_gib": 16.449,
     "before_steps_gib": 5.495, "step_s": [75.4, 9.66], "status": "ok", ...}
A child is also killed (SIGKILL, reported with the child's VmRSS / VmHWM at that moment, a lower bound of its
peak) when the machine's MemAvailable falls under --min-available GiB (default 0.75), so that an out-of-memory
network does not bring the kernel's OOM killer onto other processes. `--tiny` runs a narrow UNet of the same
structure as a smoke test.
"""
import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time

GIB = float(1 << 30)

# diffusers' SDXL base 1.0 unet/config.json (stabilityai/stable-diffusion-xl-base-1.0)
SDXL_UNET_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

NETWORKS = {
    "lora": dict(algo="lora"),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor=8),
    "lora_dora": dict(algo="lora", dora_wd=True),
    "lokr_dora": dict(algo="lokr", factor=8, dora_wd=True),
}


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_gib():
    return proc_status_kib("VmRSS") * 1024 / GIB


def hwm_gib():
    return proc_status_kib("VmHWM") * 1024 / GIB


def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def lycoris_version():
    try:
        from importlib.metadata import version

        return version("lycoris-lora")
    except Exception:
        import lycoris

        return getattr(lycoris, "__version__", "unknown")


def child(args):
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    import lycoris
    from lycoris import create_lycoris

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"network": args.child, "lycoris": lycoris_version(), "torch": torch.__version__,
           "threads": args.threads, "autocast": not args.no_autocast, "bypass_mode": args.bypass,
           "steps": args.steps}

    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    try:
        cfg = dict(SDXL_UNET_CONFIG)
        if args.tiny:  # smoke test: the same structure, narrow
            cfg.update(block_out_channels=[32, 64, 128], attention_head_dim=[1, 1, 2],
                       transformer_layers_per_block=[1, 1, 2])
        unet = UNet2DConditionModel(**cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    unet.train()
    out["unet_params"] = sum(p.numel() for p in unet.parameters())
    out["unet_dtypes"] = sorted({str(p.dtype) for p in unet.parameters()})
    out["build_unet_s"] = round(time.perf_counter() - t0, 1)
    out["after_unet_gib"] = round(rss_gib(), 3)

    t0 = time.perf_counter()
    kw = dict(NETWORKS[args.child])
    algo = kw.pop("algo")
    # create_lycoris' apply_preset only reads the generic keys (target_module / target_name), which the built-in
    # presets leave out (they carry unet_* / text_encoder_* keys for kohya's wrapper): without this, every Linear
    # and Conv of the UNet is wrapped. Apply the preset's UNet half, as lycoris.kohya does for a kohya UNet.
    from lycoris import LycorisNetwork
    from lycoris.config import PRESET

    preset = PRESET[args.preset]
    LycorisNetwork.apply_preset({k: v for k, v in {
        "enable_conv": preset.get("enable_conv"), "target_module": preset.get("unet_target_module"),
        "target_name": preset.get("unet_target_name"), "module_algo_map": preset.get("module_algo_map"),
        "name_algo_map": preset.get("name_algo_map")}.items() if v is not None})
    net = create_lycoris(unet, 1.0, linear_dim=args.rank, linear_alpha=args.rank, algo=algo,
                         conv_dim=args.conv_rank, conv_alpha=args.conv_rank, preset=args.preset,
                         bypass_mode=args.bypass, **kw)
    net.apply_to()
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    out["lycoris_modules"] = len(net.loras)
    table = {}
    for m in net.loras:
        kind = getattr(m, "module_type", type(m.org_module[0]).__name__)
        key = f"{type(m).__name__}/{kind}"
        table[key] = table.get(key, 0) + 1
    out["module_table"] = table
    out["lycoris_params"] = sum(p.numel() for p in params)
    out["lycoris_dtypes"] = sorted({str(p.dtype) for p in params})
    names = {type(m).__name__ for m in unet.modules()}
    out["target_module"] = [t for t in type(net).TARGET_REPLACE_MODULE if t in names]
    out["target_name"] = list(type(net).TARGET_REPLACE_NAME)
    opt = torch.optim.AdamW(params, lr=1e-4)
    out["build_network_s"] = round(time.perf_counter() - t0, 1)

    B, res = 1, 256
    latents = torch.randn(B, 4, res // 8, res // 8)
    context = torch.randn(B, 77, 2048, dtype=torch.bfloat16)
    text_embeds = torch.randn(B, 1280, dtype=torch.bfloat16)
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * B, dtype=torch.bfloat16)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float()

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (B,))
        a = alphas_cumprod[t].view(B, 1, 1, 1)
        noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_autocast):
            pred = unet(noisy, t, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred.float(), noise, reduction="mean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    out["before_steps_gib"] = round(rss_gib(), 3)
    out["load1_before"] = round(os.getloadavg()[0], 2)
    reset_hwm()
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(round(time.perf_counter() - t0, 2))
        if i == 0:
            out["step1_peak_gib"] = round(hwm_gib(), 3)
        print(f"[{args.child}] step {i + 1}: {times[-1]} s, loss {losses[-1]:.4f}, HWM {hwm_gib():.2f} GiB",
              file=sys.stderr, flush=True)
    out["steps_peak_gib"] = round(hwm_gib(), 3)
    out["load1_after"] = round(os.getloadavg()[0], 2)
    out["step_s"] = times
    out["loss"] = [round(x, 5) for x in losses]
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    out["status"] = "ok"
    # the schema's fields first
    head = ["network", "lycoris", "peak_rss_gib", "steps_peak_gib", "before_steps_gib", "step_s", "status"]
    print(json.dumps({**{k: out[k] for k in head}, **{k: v for k, v in out.items() if k not in head}}), flush=True)


def mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("inf")


def run_child(cmd, args):
    """Runs one child; kills it (SIGKILL) when the machine's MemAvailable falls under --min-available GiB, so an
    out-of-memory configuration does not push the kernel's OOM killer onto other processes. Returns (return
    code or None on timeout, stdout, the watchdog's reason or None)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=None, text=True)
        t0, reason = time.monotonic(), None
        while p.poll() is None:
            avail = mem_available_gib()
            if avail < args.min_available:
                try:
                    with open(f"/proc/{p.pid}/status") as f:
                        st = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmRSS", "VmHWM"))}
                    child_mem = (f", the child's VmRSS {st['VmRSS'] * 1024 / GIB:.2f} GiB, "
                                 f"VmHWM {st['VmHWM'] * 1024 / GIB:.2f} GiB")
                except (OSError, KeyError, ValueError):
                    child_mem = ""
                reason = f"MemAvailable {avail:.2f} GiB < {args.min_available} GiB{child_mem}"
                p.kill()
                break
            if time.monotonic() - t0 > args.timeout:
                p.kill()
                p.wait()
                out.seek(0)
                return None, out.read(), None
            time.sleep(0.05)
        rc = p.wait()
        out.seek(0)
        return rc, out.read(), reason


def parent(args):
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    for n in names:
        if n not in NETWORKS:
            sys.exit(f"unknown network {n!r}; known: {', '.join(NETWORKS)}")
    version = lycoris_version()
    for n in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", n, "--steps", str(args.steps),
               "--threads", str(args.threads), "--rank", str(args.rank), "--conv-rank", str(args.conv_rank),
               "--preset", args.preset]
        if args.no_autocast:
            cmd.append("--no-autocast")
        if args.bypass:
            cmd.append("--bypass")
        if args.tiny:
            cmd.append("--tiny")
        load_before = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        rc, stdout, watchdog = run_child(cmd, args)
        wall = round(time.perf_counter() - t0, 1)
        line = None
        for l in reversed(stdout.splitlines()):
            if l.startswith("{"):
                line = l
                break
        if rc == 0 and line:
            rec = json.loads(line)
        else:
            if watchdog:
                status = f"killed (signal 9, by this script's watchdog: {watchdog})"
            elif rc is None:
                status = f"timeout ({args.timeout} s)"
            elif rc < 0:
                status = f"killed (signal {-rc}: {signal.Signals(-rc).name})"
            else:
                status = f"failed (exit {rc})"
            rec = {"network": n, "lycoris": version, "peak_rss_gib": None, "steps_peak_gib": None,
                   "before_steps_gib": None, "step_s": None, "status": status, "load1_before": load_before}
        rec["wall_s"] = wall
        print(json.dumps(rec), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--networks", default=",".join(NETWORKS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--conv-rank", type=int, default=2)
    ap.add_argument("--preset", default="full")
    ap.add_argument("--no-autocast", action="store_true", help="run the forward without bf16 autocast")
    ap.add_argument("--bypass", action="store_true", help="LyCORIS bypass_mode=True")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per child before it is killed")
    ap.add_argument("--min-available", type=float, default=0.75,
                    help="kill the child when the machine's MemAvailable falls under this many GiB")
    ap.add_argument("--tiny", action="store_true", help="a narrow UNet of the same structure (smoke test)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
