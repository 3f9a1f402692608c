# lorakit — two commands on a fresh machine:
#   make demo   build lorakit and run the built-in demo (no downloads but libtorch)
#   make test   run every test
# Both first run scripts/setup-libtorch.sh (libtorch 2.11.0: $LIBTORCH if set
# and usable, else a project-local .venv with torch==2.11.0 from PyPI).

CARGO ?= cargo
DEMO_OUT ?= output/demo

.PHONY: all setup build demo test lint bench fixtures clean

all: build

setup:
	@bash scripts/setup-libtorch.sh

build: setup
	$(CARGO) build --release -p lora-cli

demo: build
	./target/release/lorakit demo --out $(DEMO_OUT)

test: setup
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: setup
	.venv/bin/python -m pip install -q pillow numpy 2>/dev/null || echo "(no .venv Pillow: the data bench prints lorakit figures only)"
	$(CARGO) bench

# Regenerate test fixtures (needs the Python packages named in each script).
fixtures: setup
	.venv/bin/python -m pip install -q safetensors diffusers numpy
	.venv/bin/python scripts/fixtures/lora_formats.py

clean:
	$(CARGO) clean
	rm -rf output
