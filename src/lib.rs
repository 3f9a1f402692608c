//! # lorakit
//!
//! Train, inspect and apply LoRAs for SDXL-family models from Rust. This crate
//! re-exports the workspace's library crates so `cargo add lorakit` gives the
//! whole API:
//!
//! * [`core`] (`lora-core`): adapter math, merging, kohya-format file I/O;
//! * [`sdxl`] (`lora-sdxl`): the SDXL models over libtorch;
//! * [`data`] (`lora-data`): datasets, captions, buckets, caches.
//!
//! libtorch 2.11.0 must be available at build time (see the README: `make`
//! installs it into a project-local venv, or set `LIBTORCH`).

pub use lora_core as core;
pub use lora_data as data;
pub use lora_sdxl as sdxl;
pub use tch;

/// libtorch element types, re-exported for convenience.
pub use tch::Kind;
