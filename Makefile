# lorakit — two commands on a fresh machine:
#   make demo   build lorakit and run the built-in demo (no downloads but libtorch)
#   make test   run every test (installs Chromium for the UI's browser test)
# Both first run scripts/setup-libtorch.sh (libtorch 2.11.0: $LIBTORCH if set
# and usable, else a project-local .venv with torch==2.11.0 from PyPI).

CARGO ?= cargo
DEMO_OUT ?= output/demo

.PHONY: all setup setup-browser build demo test test-numerics lint bench fixtures toy-world docs-images ui-screens gpu-build gpu-dry-run clean

all: build

setup:
	@bash scripts/setup-libtorch.sh

build: setup
	$(CARGO) build --release -p lora-cli

demo: build
	./target/release/lorakit demo --out $(DEMO_OUT)

setup-browser:
	@bash scripts/setup-browser.sh

test: setup setup-browser
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

# The numerically sensitive tests once more with the BLAS and ATen held to a
# lower instruction set and one thread (CI runs it after `make test`);
# `bash scripts/numerics.sh --report` prints every tolerance's headroom.
test-numerics: setup
	bash scripts/numerics.sh

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
	.venv/bin/python scripts/fixtures/lr_cycles.py
	.venv/bin/python -m pip install -q prodigyopt==1.1.2 lion-pytorch==0.2.5 transformers
	.venv/bin/python scripts/fixtures/optimizers.py crates/lora-sdxl/tests/fixtures/optimizers.safetensors
	.venv/bin/python -m pip install -q --no-deps bitsandbytes==0.50.2
	.venv/bin/python scripts/fixtures/adamw8bit.py
	.venv/bin/python scripts/fixtures/lion8bit.py
	.venv/bin/python scripts/fixtures/noise_loss.py crates/lora-sdxl/tests/fixtures/noise_loss.safetensors
	.venv/bin/python scripts/fixtures/timesteps.py crates/lora-sdxl/tests/fixtures/timesteps.safetensors
	.venv/bin/python scripts/fixtures/blocks.py crates/lora-sdxl/tests/fixtures/blocks.safetensors
	.venv/bin/python scripts/fixtures/ema.py crates/lora-sdxl/tests/fixtures/ema.safetensors

# Rebuild the toy-world base model from nothing (about 40 min on 2 CPU cores;
# deterministic for its seed and thread count): scenes, captions and text
# embeddings from lorakit, then VAE and UNet trained by the script.
toy-world: setup
	.venv/bin/python -m pip install -q safetensors diffusers numpy
	$(CARGO) run --release --example toy_world_data -- --out target/toy_world
	.venv/bin/python scripts/fixtures/toy_world.py target/toy_world crates/lora-sdxl/assets/toy_world.safetensors

# The README's pictures: the demo's step grid and loss chart.
docs-images: build
	rm -rf target/docs-demo
	./target/release/lorakit demo --out target/docs-demo
	mkdir -p docs
	cp target/docs-demo/demo/samples/grid.png docs/demo_grid.png
	cp target/docs-demo/demo/loss.png docs/demo_loss.png
	cp target/docs-demo/demo/scores.txt docs/demo_scores.txt

# The README's screenshots of `lorakit ui`, taken by its browser test.
ui-screens: setup setup-browser
	rm -rf target/ui-screens
	$(CARGO) test -p lora-cli --test ui_browser
	mkdir -p docs/ui
	cp target/ui-screens/dataset.png target/ui-screens/new-job-error.png target/ui-screens/job-done.png target/ui-screens/compare.png docs/ui/

# The GPU check (issue 16): build what travels to the GPU machine into
# dist/gpu, or run the same script here on the CPU with a tiny model.
gpu-build: setup
	.venv/bin/python -m pip install -q safetensors diffusers peft transformers numpy
	bash scripts/gpu-build.sh

gpu-dry-run: setup
	.venv/bin/python -m pip install -q safetensors diffusers peft transformers numpy
	$(CARGO) build -p lora-cli
	$(CARGO) test --bench gpu_check --no-run
	bash scripts/gpu-check.sh --dry-run

clean:
	$(CARGO) clean
	rm -rf output
