"""Reference side of benches/lora_resize.rs: resizing LoRA modules the way
kohya's networks/resize_lora.py does it — merge ΔW = up·down, then
torch.linalg.svd of the full out×in matrix (svd_lowrank when both sides
exceed 2048), truncate, S into up — in PyTorch on CPU.

usage: resize_reference.py LORA.safetensors RANK CONV_RANK EVERY THREADS
Only modules whose kohya name's byte sum is divisible by EVERY are resized
(the Rust side picks the same ones). Prints one JSON line.
"""
import json
import math
import sys
import time

import torch
from safetensors.torch import load_file


def main():
    path, rank, conv_rank, every, threads = sys.argv[1:6]
    rank, conv_rank, every = int(rank), int(conv_rank), int(every)
    torch.set_num_threads(int(threads))
    sd = load_file(path)
    suffix = ".lora_down.weight"
    names = sorted(k[: -len(suffix)] for k in sd if k.endswith(suffix))
    names = [n for n in names if sum(n.encode()) % every == 0]
    fro = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for n in names:
            down = sd[n + suffix].float()
            up = sd[n + ".lora_up.weight"].float()
            spatial = down.dim() == 4 and down.shape[-1] > 1
            k = conv_rank if spatial else rank
            out, r = up.shape[0], down.shape[0]
            w = up.reshape(out, r) @ down.reshape(r, -1)
            if w.shape[0] > 2048 and w.shape[1] > 2048:
                u, s, v = torch.svd_lowrank(w, q=min(2 * k, *w.shape), niter=2)
                vh = v.T
            else:
                u, s, vh = torch.linalg.svd(w)
            k = min(k, s.shape[0])
            new_up = u[:, :k] @ torch.diag(s[:k])
            new_down = vh[:k, :]
            del new_up, new_down
            total = float(s.pow(2).sum())
            fro.append(math.sqrt(float(s[:k].pow(2).sum()) / total) if total > 0 else 1.0)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "modules": len(names), "fro_mean": sum(fro) / max(len(fro), 1)}))


if __name__ == "__main__":
    main()
