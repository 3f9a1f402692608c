#!/usr/bin/env python3
"""The Pillow equivalent of lorakit's data pipeline, for benches/data_pipeline.rs.

For each image: read, EXIF-transpose, convert to RGB, pick the bucket (same
rule as lorakit: nearest aspect among buckets that need no upscale), resize the
crop box to the bucket with LANCZOS, convert to float32 CHW in [-1, 1].
Usage: pillow_pipeline.py WORKERS RESOLUTION FILE...   (prints images/s)
"""
import math
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageOps


def buckets(res, min_side, max_side, d=64):
    area = res * res
    s = int(math.sqrt(area)) // d * d
    out = {(s, s)}
    w = max(min_side // d * d, d)
    mx = -(-max_side // d) * d
    while w <= mx:
        h = min((area // w) // d * d, mx)
        if h >= min_side // d * d:
            out.add((w, h))
            out.add((h, w))
        w += d
    return sorted(out)


def select(bs, w, h):
    ar = w / h
    if (w, h) in bs:
        return (w, h)
    fits = [b for b in bs if b[0] <= w and b[1] <= h]
    pool = fits or bs
    return min(pool, key=lambda b: abs(b[0] / b[1] - ar))


def process(args):
    path, res = args
    bs = buckets(res, min(256, res), max(1024, res))
    im = Image.open(path)
    im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    bw, bh = select(bs, w, h)
    scale = max(bw / w, bh / h)
    cw, ch = bw / scale, bh / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    out = im.resize((bw, bh), Image.LANCZOS, box=(left, top, left + cw, top + ch))
    arr = np.asarray(out, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return arr.shape


def main():
    workers, res, files = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    jobs = [(f, res) for f in files]
    t = time.perf_counter()
    if workers <= 1:
        for j in jobs:
            process(j)
    else:
        with Pool(workers) as p:
            list(p.imap_unordered(process, jobs, chunksize=4))
    dt = time.perf_counter() - t
    print(f"{len(files) / dt:.2f}")


if __name__ == "__main__":
    main()
