//! **The model room**: the SDXL networks and everything needed to build them
//! from a checkpoint.
//!
//! One file per component, candle-transformers style — each takes a config
//! struct ([`config`]) and a path-scoped weight builder ([`weights`]) so module
//! paths equal checkpoint keys:
//!
//! | concept | file |
//! |---|---|
//! | where each tensor lives in a single-file checkpoint | [`keys`] |
//! | memory-mapped checkpoints, path-scoped `VarBuilder` | [`weights`] |
//! | configs and presets (`SdxlConfig::base()` / `::tiny()`), a file's CLIP naming | [`config`] |
//! | configs read off a checkpoint's keys and shapes (`UnetConfig::infer`, …) | [`infer`] |
//! | Linear / Conv2d / norms with LoRA slots | [`nn`] |
//! | ResBlock, SpatialTransformer, UNet, VAE, CLIP-L / bigG | [`resnet`], [`attention`], [`unet`], [`vae`], [`clip`] |
//! | detection + loading the whole model | [`sdxl`] |
//! | attaching LoRAs to the slots | [`lora`] |
//! | the modules kohya's LoRA / LoCon adapts | [`targets`] |
//! | CLIP tokenizer, text and size conditioning | [`tokenizer`], [`conditioning`] |
//! | training captions as kohya encodes them (`max_token_length`) | [`captions`] |
//! | the DDPM noise schedule (σs for samplers, targets for training) | [`schedule`] |
//! | gradient checkpointing through the C++ shim | [`grad_checkpoint`] |

pub mod attention;
pub mod captions;
pub mod clip;
pub mod conditioning;
pub mod config;
pub mod grad_checkpoint;
pub mod infer;
pub mod keys;
pub mod lora;
pub mod nn;
pub mod resnet;
pub mod schedule;
pub mod sdxl;
pub mod targets;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
