//! # lora-sdxl
//!
//! SDXL-family models over libtorch (via `tch`) with LoRA slots.
//!
//! Present today: the model configuration ([`SdxlConfig::base`],
//! [`SdxlConfig::tiny`]), the enumeration of every module kohya's LoRA/LoCon
//! adapts ([`targets::lora_targets`]) and the single-file key layout
//! ([`keys`]). The UNet, text encoders, VAE, loader, samplers and trainer are
//! tracked in the project's issues.

pub mod attention;
pub mod clip;
pub mod conditioning;
pub mod config;
pub mod error;
pub mod job;
pub mod keys;
pub mod model;
pub mod nn;
pub mod optim;
pub mod resnet;
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
pub use job::{JobConfig, JobError};
pub use model::{detect, Detected, SdxlModel};
pub use targets::{lora_targets, Target, TargetScope};
pub use tokenizer::ClipTokenizer;
pub use unet::Unet;
pub use vae::Vae;
pub use weights::{Checkpoint, VarBuilder};
