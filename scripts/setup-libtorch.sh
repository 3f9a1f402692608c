#!/usr/bin/env bash
# Makes libtorch 2.11.0 (what tch 0.24 requires) available to cargo.
#
#  * If $LIBTORCH points at a usable libtorch, that one is used.
#  * Otherwise a project-local venv (.venv, git-ignored) gets torch==2.11.0
#    from PyPI (~4.6 GB the first time, about a minute on a good link).
#
# Either way `.libtorch` (git-ignored) becomes a link to the libtorch root and
# `.cargo/config.toml` points LIBTORCH at it, so plain `cargo build` and
# `cargo test` work afterwards. A LIBTORCH set in the environment still wins
# over the config file. Re-running is a fast no-op.
set -euo pipefail

want="2.11.0"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { echo "setup-libtorch: $*" >&2; }

version_of() { # $1 = libtorch root; prints its version (without +cuXXX)
  local v=""
  if [ -f "$1/version.py" ]; then
    v=$(sed -n "s/^__version__ *= *['\"]\([^'\"]*\)['\"].*/\1/p" "$1/version.py" | head -n1)
  elif [ -f "$1/build-version" ]; then
    v=$(head -n1 "$1/build-version")
  fi
  echo "${v%%+*}"
}

usable() { # $1 = libtorch root
  [ -f "$1/lib/libtorch_cpu.so" ] || [ -f "$1/lib/libtorch_cpu.dylib" ] || return 1
  [ -d "$1/include/torch" ] || return 1
  local v; v=$(version_of "$1")
  if [ -n "$v" ] && [ "$v" != "$want" ]; then
    say "libtorch at $1 is version $v; tch 0.24 needs exactly $want"
    return 1
  fi
  return 0
}

link_to() {
  local target; target=$(cd "$1" && pwd -P)
  if [ "$(readlink .libtorch 2>/dev/null || true)" != "$target" ]; then
    ln -sfn "$target" .libtorch
    say "using libtorch $(version_of "$target") at $target"
  fi
}

if [ -n "${LIBTORCH:-}" ]; then
  if usable "$LIBTORCH"; then
    link_to "$LIBTORCH"
    exit 0
  fi
  say "LIBTORCH=$LIBTORCH is not a usable libtorch $want (need lib/libtorch_cpu.so and include/torch); falling back to a local venv"
  if [ "$(cd "$LIBTORCH" 2>/dev/null && pwd -P)" != "$(cd .libtorch 2>/dev/null && pwd -P)" ]; then
    say "note: cargo still sees your LIBTORCH; unset it to use the venv"
  fi
fi

py=${PYTHON:-python3}
find_venv_torch() {
  ls -d .venv/lib/python3*/site-packages/torch 2>/dev/null | head -n1
}

torch_dir=$(find_venv_torch || true)
if [ -z "$torch_dir" ] || ! usable "$torch_dir"; then
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($py --version 2>&1)"
    "$py" -m venv .venv || { say "cannot create a venv: install python3-venv (apt-get install python3-venv) or set LIBTORCH"; exit 1; }
  fi
  say "installing torch==$want from PyPI into .venv (about 4.6 GB, once)"
  # --no-cache-dir: the wheels are large; a cached copy would double the disk used.
  .venv/bin/python -m pip install --disable-pip-version-check --no-cache-dir -q "torch==$want"
  torch_dir=$(find_venv_torch)
  usable "$torch_dir" || { say "torch installed but $torch_dir has no usable libtorch"; exit 1; }
fi
link_to "$torch_dir"
