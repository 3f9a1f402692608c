//! # lora-sdxl
//!
//! SDXL-family models over libtorch (via `tch`) with LoRA slots.
//!
//! * [`SdxlModel::load`]: single-file checkpoints (and diffusers folders) of
//!   SDXL 1.0 and its fine-tunes, recognised from keys and shapes
//!   ([`SdxlConfig::base`], [`SdxlConfig::tiny`] for tests);
//! * LoRA slots on every module kohya's LoRA/LoCon adapts
//!   ([`targets::lora_targets`]), LoRAs attached at strengths
//!   ([`SdxlModel::attach_lora`]);
//! * text-to-image with ComfyUI-compatible seeds ([`pipeline::txt2img`],
//!   samplers in [`sampling`]);
//! * LoRA training from a job file ([`train::train`], [`JobConfig`]).

pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod compare;
pub mod conditioning;
pub mod config;
pub mod error;
pub mod extract;
pub mod job;
pub mod keys;
pub mod merge;
pub mod model;
pub mod nn;
pub mod optim;
pub mod pipeline;
pub mod resnet;
pub mod sampling;
pub mod schedule;
pub mod synthetic;
pub mod targets;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use clip::{Activation, ClipLayout, ClipOutput, ClipTextModel};
pub use conditioning::{encode_prompt, TextConditioning};
pub use config::{ClipConfig, SdxlConfig, UnetConfig, VaeConfig};
pub use error::{Result, SdxlError};
pub use extract::{extract_lora, ExtractOptions, Extracted};
pub use job::{JobConfig, JobError};
pub use merge::{merge_into_checkpoint, MergeReport};
pub use model::{detect, Detected, SdxlModel};
pub use pipeline::{txt2img, GenerateParams};
pub use sampling::{Sampler, SamplerSpec, SigmaSchedule};
pub use targets::{lora_targets, Target, TargetScope};
pub use tokenizer::ClipTokenizer;
pub use unet::Unet;
pub use vae::Vae;
pub use weights::{Checkpoint, VarBuilder};
