//! # lora-sdxl
//!
//! SDXL-family models over libtorch (via `tch`) with LoRA slots, in four rooms:
//!
//! * [`model`]: the networks and their loading — [`SdxlModel::load`] reads
//!   single-file checkpoints (and diffusers folders) of SDXL 1.0 and its
//!   fine-tunes, recognised from keys and shapes ([`SdxlConfig::base`],
//!   [`SdxlConfig::tiny`] for tests); LoRA slots on every module kohya's
//!   LoRA/LoCon adapts ([`lora_targets`]), LoRAs attached at strengths
//!   ([`SdxlModel::attach_lora`]);
//! * [`sample`]: text-to-image with ComfyUI-compatible seeds ([`txt2img`],
//!   samplers in [`sample::samplers`]) and comparison grids;
//! * [`train`](mod@train): LoRA training from a job file ([`train()`], [`JobConfig`]);
//! * [`tools`]: merging LoRAs into a checkpoint and extracting them from one.
//!
//! [`render`] draws what people look at: comparison grids, the loss chart,
//! PNGs carrying their generation parameters.
//!
//! [`device`] says what a run computes on (versions, attention backends,
//! CUDA memory figures); [`dist`] joins a data-parallel run (c10d).
//!
//! [`synthetic`] writes tiny random SDXL-architecture checkpoints in the real
//! single-file layout for tests, examples and the demo.

pub mod device;
pub mod dist;
pub mod error;
pub mod model;
pub mod render;
pub mod sample;
pub mod synthetic;
pub mod tools;
pub mod toy_world;
pub mod train;

pub use error::{Result, SdxlError};
pub use model::clip::{Activation, ClipOutput, ClipTextModel};
pub use model::conditioning::{encode_prompt, TextConditioning};
pub use model::config::ClipLayout;
pub use model::config::{ClipConfig, SdxlConfig, UnetConfig, VaeConfig};
pub use model::sdxl::{detect, resolve_device, Detected, SdxlModel};
pub use model::targets::{lora_targets, Target, TargetScope};
pub use model::tokenizer::ClipTokenizer;
pub use model::unet::Unet;
pub use model::vae::Vae;
pub use model::weights::{Checkpoint, VarBuilder};
pub use sample::samplers::{Sampler, SamplerSpec, SigmaSchedule};
pub use sample::txt2img::{txt2img, GenerateParams};
pub use tools::extract::{extract_lora, ExtractOptions, Extracted};
pub use tools::merge::{merge_into_checkpoint, MergeReport};
pub use train::job::{JobConfig, JobError};
pub use train::{train, TrainOptions, TrainReport};
