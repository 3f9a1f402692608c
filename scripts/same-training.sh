#!/usr/bin/env bash
# Behaviour check for refactors of the trainer: trains three small CPU jobs
# that between them take every named choice of the plan (network type,
# optimizer, LR schedule, loss, timestep distribution, prediction, dtypes)
# and prints a digest of each output file's tensors and of its metadata
# (time fields aside). Run it before and after a change: a change that keeps
# behaviour prints the same lines on the same machine.
#
#   scripts/same-training.sh [LORAKIT_BIN] [WORK_DIR]
#
# LORAKIT_BIN defaults to target/debug/lorakit; the tiny model and dataset
# come from `cargo run --example train_observer` (same seeds every time).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:-$root/target/debug/lorakit}")
work=${2:-$(mktemp -d)}
mkdir -p "$work"
work=$(realpath "$work")
cd "$work"
if [ ! -f model.safetensors ]; then
  (cd "$root" && cargo run -q --example train_observer -- "$work/obs" >/dev/null 2>&1)
  cp obs/tiny_sdxl.safetensors model.safetensors
  rm -rf data && cp -r obs/dataset data
fi
"$bin" init --out base.toml --model model.safetensors --dataset data --trigger trig --force >/dev/null
python3 - <<'PY'
import re
base = re.sub(r'^id = .*\n', '', open('base.toml').read(), flags=re.M)
common = [('steps = 3000', 'steps = 6'), ('save_every = 100', 'save_every = 3'),
          ('batch_size = 2', 'batch_size = 1'), ('resolution = [512, 768]', 'resolution = [256]'),
          ('gradient_accumulation = 2', 'gradient_accumulation = 1'),
          ('# device = "cuda"', 'device = "cpu"'), ('# images = 4', 'images = 1')]
jobs = {
    'a': [],
    'b': [('type = "lora"', 'type = "lokr"'), ('optimizer = "adamw"', 'optimizer = "prodigy"'),
          ('lr = 0.00007 ', 'lr = 1.0 '), ('lr_scheduler = "constant"', 'lr_scheduler = "cosine"'),
          ('loss = "l2"', 'loss = "huber"'), ('timestep_sampling = "uniform"', 'timestep_sampling = "logit_normal"'),
          ('dtype = "bf16"  ', 'dtype = "fp32"  '), ('# prediction = "v_prediction"', 'prediction = "v_prediction"'),
          ('dtype = "fp16" ', 'dtype = "bf16" ')],
    'c': [('type = "lora"', 'type = "loha"'), ('dora = false', 'dora = true'),
          ('optimizer = "adamw"', 'optimizer = "lion"'), ('lr_scheduler = "constant"', 'lr_scheduler = "linear"'),
          ('timestep_sampling = "uniform"', 'timestep_sampling = "sigmoid"'),
          ('# sigmoid_scale = 5.0', 'sigmoid_scale = 5.0'), ('dtype = "fp16" ', 'dtype = "fp32" '),
          ('# prediction = "v_prediction"', 'prediction = "epsilon"'), ('warmup_steps = 0', 'warmup_steps = 2')],
}
for name, edits in jobs.items():
    text = base
    for a, b in common + [('name = "trig"', f'name = "{name}"')] + edits:
        assert a in text, a
        text = text.replace(a, b, 1)
    open(f'{name}.toml', 'w').write(text)
PY
rm -rf output
for j in a b c; do
  "$bin" --quiet train "$j.toml" >/dev/null 2>"log_$j.txt" || { echo "job $j failed:"; tail -3 "log_$j.txt"; exit 1; }
done
python3 - output/a/a.safetensors output/a/a_000000003.safetensors output/b/b.safetensors \
  output/b/state.safetensors output/c/c.safetensors <<'PY'
import hashlib, json, struct, sys
for p in sys.argv[1:]:
    b = open(p, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    h = json.loads(b[8:8 + n])
    md = {k: v for k, v in h.pop('__metadata__', {}).items()
          if not ('time' in k or k.endswith('_at') or 'session' in k or k.startswith('sshs_') or k == 'modelspec.date')}
    t = hashlib.sha256(json.dumps(h, sort_keys=True).encode() + b[8 + n:]).hexdigest()[:16]
    m = hashlib.sha256(json.dumps(md, sort_keys=True).encode()).hexdigest()[:16]
    print(p, 'tensors', t, 'metadata', m)
PY
