#!/usr/bin/env bash
# The GPU check of issue 16, in one run on the GPU machine (H200, torch
# 2.11.0+cu130, no cargo): correctness of the CUDA path against the CPU,
# lorakit's real trainer vs diffusers + peft (s/step, samples/s, peak
# memory, MFU) at 1024² batch 1 and 4 and 512² batch 4 with and without
# gradient checkpointing, host syncs per step, and txt2img at 1024², 25
# steps, CFG 7 against StableDiffusionXLPipeline, and each train.vram
# preset's peak under a memory cap of its size, and data-parallel training
# over c10d as 2 (or one per GPU) ranks. Every figure lands in
# $OUT (results.jsonl, one JSON object per measurement, and the logs).
#
#   here:        bash scripts/gpu-build.sh          (binaries + wheel: dist/gpu.tar.xz)
#   device tool: run  carry ["dist/gpu.tar.xz"]  command "bash scripts/gpu-check.sh",
#                timeout_s 560 (results.jsonl is written as it goes)
#   dry run:     bash scripts/gpu-check.sh --dry-run (CPU, tiny model, small sizes;
#                uses target/ builds and .venv when dist/gpu is absent)
#
# Budget: about 8 minutes on the H200 (each step count below is small for that).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-/tmp/lorakit-gpu}
mkdir -p "$OUT" "$WORK"
RES="$OUT/results.jsonl"
: >"$RES"
log() { echo "gpu-check: $*" | tee -a "$OUT/log.txt" >&2; }
START=$(date +%s)

# --- binaries and Python
if [ -f dist/gpu.tar.xz ] && [ ! -x dist/gpu/gpu_check ]; then
  tar -C dist -xJf dist/gpu.tar.xz
fi
# gpu_check alone travels (lorakit, with its embedded toy world, would not fit);
# it links the same libraries and says what `lorakit --version` says
if [ -x dist/gpu/gpu_check ]; then
  GC=dist/gpu/gpu_check
else
  GC=$(ls -t target/*/deps/gpu_check-* 2>/dev/null | grep -v '\.d$' | head -1)
fi
[ -n "$GC" ] && [ -x "$GC" ] || { log "no gpu_check: run scripts/gpu-build.sh (or cargo test --bench gpu_check --no-run) first"; exit 1; }
PY=python3
[ -x .venv/bin/python ] && [ $DRY = 1 ] && PY=.venv/bin/python
TORCH_LIB=$($PY -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -d dist/gpu/whl ] && ! $PY -c 'import diffusers' 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site dist/gpu/whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1

# --- what runs where
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(cat dist/gpu/COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  echo "lorakit: $($GC version)"
  $PY -c 'import torch; print("python torch:", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
  $PY -c 'import diffusers, peft; print("diffusers", diffusers.__version__, "peft", peft.__version__)' 2>&1
  ldd "$GC" | grep -E 'libtorch_cuda|libc10_cuda|not found'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >&2
if [ $DRY = 0 ] && ! grep -q "CUDA available" "$OUT/env.txt"; then
  log "lorakit does not see CUDA (see env.txt: libtorch_cuda.so / libc10_cuda.so must resolve)"
  exit 1
fi

# run NAME CMD...: one JSON line from CMD appended to results.jsonl, tagged with NAME
run() {
  local name=$1
  shift
  local t0=$(date +%s)
  local line
  line=$("$@" 2>>"$OUT/$name.err" | tail -1)
  if [ -n "$line" ] && echo "$line" | $PY -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null; then
    echo "{\"check\": \"$name\", \"result\": $line}" >>"$RES"
    log "$name ($(($(date +%s) - t0)) s): $line"
  else
    echo "{\"check\": \"$name\", \"error\": \"failed: see $name.err\"}" >>"$RES"
    log "$name FAILED ($(($(date +%s) - t0)) s): $(tail -3 "$OUT/$name.err" | tr '\n' ' ')"
  fi
}

if [ $DRY = 1 ]; then
  DEV=cpu MODEL="$WORK/tiny.safetensors" STEPS=6 SAMPLE_STEPS=3
  CONFIGS="128:1 128:2"
  SAMPLE_RES=128
  $GC write-tiny "$MODEL" >/dev/null
else
  DEV=cuda MODEL="$WORK/sdxl_full.safetensors" STEPS=13 SAMPLE_STEPS=25
  CONFIGS="1024:1 1024:4 512:4"
  SAMPLE_RES=1024
  $GC write-model "$MODEL" >/dev/null
fi
DIFF=(benches/gpu/diffusers_cuda.py)
[ $DRY = 1 ] && DIFF+=(--dry-run)

# 1. correctness (tiny fixture): outputs and LoRA gradients vs the CPU
run correctness $GC correctness $DEV

# 2. training speed and memory, both sides, each configuration
for c in $CONFIGS; do
  r=${c%%:*} b=${c##*:}
  for ck in on off; do
    run "train_lorakit_${r}_b${b}_ckpt_${ck}" $GC train "$MODEL" $DEV $r $b $ck $STEPS "$WORK"
    run "train_diffusers_${r}_b${b}_ckpt_${ck}" $PY "${DIFF[@]}" train $r $b $ck $((STEPS - 3))
  done
done

# 3. host syncs per step (torch's sync-debug mode after the first step)
r=${CONFIGS%%:*}
LORAKIT_SYNC_DEBUG=warn $GC train "$MODEL" $DEV $r 1 on 11 "$WORK" >"$OUT/syncs.json" 2>"$OUT/syncs.err"
n=$(grep -c "called a synchronizing CUDA operation" "$OUT/syncs.err" || true)
echo "{\"check\": \"host_syncs\", \"result\": {\"steps_watched\": 10, \"sync_warnings\": $n, \"loss_reads\": 2}}" >>"$RES"
log "host syncs over 10 watched steps: $n (2 expected: the loss reads at steps 10 and 11; validation and saves are not watched)"

# 4. sampling
run sample_lorakit $GC sample "$MODEL" $DEV $SAMPLE_RES $SAMPLE_STEPS
run sample_diffusers $PY "${DIFF[@]}" sample $SAMPLE_RES $SAMPLE_STEPS

# 5. the train.vram presets at their batch cap at 1024², each under a memory
# cap of its size (PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction): a
# failure here is an out-of-memory, i.e. the preset does not fit
if [ $DRY = 1 ]; then
  PRESETS="8gb:1" PRES=128 TOTAL_MIB=143771
else
  PRESETS="8gb:1 12gb:2 16gb:4 24gb:8" PRES=1024
  TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
fi
for p in $PRESETS; do
  gb=${p%%:*} b=${p##*:}
  frac=$($PY -c "print(round(${gb%gb} * 1024 / $TOTAL_MIB, 4))")
  PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:$frac \
    run "vram_${gb}" $GC train "$MODEL" $DEV $PRES $b preset 6 "$WORK" $gb
done

# 6. data-parallel (issue 15): the real trainer as 1 and as N ranks (c10d
# Gloo; CUDA tensors go through host copies, NCCL is not wired yet) at the
# first configuration, batch 1 per rank; N = the GPUs, at least 2 (two ranks
# then share the one GPU: the path is proven, the scaling is not measured)
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NR=$((NGPU > 2 ? NGPU : 2))
r=${CONFIGS%%:*}
PORT=$((29500 + RANDOM % 1000))
for rank in $(seq 1 $((NR - 1))); do
  RANK=$rank WORLD_SIZE=$NR LOCAL_RANK=$rank MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT GLOO_SOCKET_IFNAME=lo \
    LORAKIT_DIST_TIMEOUT=300 $GC train "$MODEL" $DEV $r 1 on $STEPS "$WORK" >/dev/null 2>"$OUT/dp_rank$rank.err" &
done
RANK=0 WORLD_SIZE=$NR LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT GLOO_SOCKET_IFNAME=lo LORAKIT_DIST_TIMEOUT=300 \
  run "train_lorakit_${r}_b1_dp${NR}_gpus${NGPU}" $GC train "$MODEL" $DEV $r 1 on $STEPS "$WORK"
wait

log "done in $(($(date +%s) - START)) s; results in $RES"
