"""Reference side of the extraction part of benches/lora_resize.rs: the SVD
step of kohya's networks/extract_lora_from_models.py — torch.linalg.svd of
each full ΔW, keep the leading RANK singular triplets — in PyTorch on CPU.

usage: extract_reference.py SHAPES.json RANK THREADS
SHAPES.json lists [out, in] per module; module i's ΔW is generated exactly as
the Rust side does (torch.manual_seed(i), then (randn(out, 256) @ randn(256,
in)) / 16 + 0.1 * randn(out, in)), outside the timed part. Prints one JSON
line: seconds (SVD + truncation only) and the mean share of ‖ΔW‖_F kept.
"""
import json
import math
import sys
import time

import torch


def delta(i, out, inn):
    torch.manual_seed(i)
    a = torch.randn(out, 256)
    b = torch.randn(256, inn)
    n = torch.randn(out, inn)
    return (a @ b) / 16 + 0.1 * n


def main():
    shapes = json.load(open(sys.argv[1]))
    rank = int(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]))
    seconds = 0.0
    fro = []
    with torch.no_grad():
        for i, (out, inn) in enumerate(shapes):
            w = delta(i, out, inn)
            t0 = time.perf_counter()
            u, s, vh = torch.linalg.svd(w)
            k = min(rank, s.shape[0])
            up = u[:, :k] @ torch.diag(s[:k])
            down = vh[:k, :]
            seconds += time.perf_counter() - t0
            del up, down
            fro.append(math.sqrt(float(s[:k].pow(2).sum()) / float(s.pow(2).sum())))
    print(json.dumps({"seconds": seconds, "modules": len(shapes), "fro_mean": sum(fro) / len(fro)}))


if __name__ == "__main__":
    main()
