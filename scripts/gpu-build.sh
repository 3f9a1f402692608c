#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on the GPU machine (which has torch
# 2.11.0+cu130 and Python but no cargo and no network) into dist/gpu/:
#   gpu_check            the release bench binary, stripped (everything that
#                        travels must fit in 64 MiB, and the tracked tree is
#                        38 MB: lorakit itself, 38 MB stripped with the toy
#                        world embedded, does not fit beside it)
#   whl/                 the diffusers wheel and importlib_metadata (the only
#                        packages of the reference side missing there)
# packed as dist/gpu.tar.xz. Then, with the device tool: carry
# ["dist/gpu.tar.xz"] and run `bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-libtorch.sh >/dev/null
rm -rf dist/gpu dist/gpu.tar.xz
mkdir -p dist/gpu
bin=$(cargo bench --bench gpu_check --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_check" and m.get("executable"):
        print(m["executable"])')
[ -n "$bin" ] || { echo "gpu-build: cargo did not report the gpu_check binary" >&2; exit 1; }
strip -o dist/gpu/gpu_check "$bin"
ver=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("diffusers"))' 2>/dev/null || echo "")
[ -n "$ver" ] || { echo "gpu-build: install diffusers into .venv first (make fixtures does)" >&2; exit 1; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d dist/gpu/whl \
  "diffusers==$ver" importlib_metadata
git rev-parse --short HEAD >dist/gpu/COMMIT
git diff --quiet HEAD || echo "(with uncommitted changes)" >>dist/gpu/COMMIT
# the tracked tree alone is ~38 MB of the 64 MiB that travel: carry one xz archive
tar -C dist -cJf dist/gpu.tar.xz gpu
du -sh dist/gpu/* dist/gpu.tar.xz
echo "gpu-build: ready; on the device: carry [\"dist/gpu.tar.xz\"], command: bash scripts/gpu-check.sh"
