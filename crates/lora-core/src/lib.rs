//! # lora-core
//!
//! LoRA / LoCon adapters for SDXL-family models and their kohya-format files.
//!
//! * [`LoraAdapter`]: one adapter over a frozen Linear or Conv2d (forward with
//!   kohya's dropouts, merge/unmerge into the base weight).
//! * [`LoraSet`]: adapters addressed by [`ModuleKey`] (component + module path),
//!   saved with [`LoraSet::save`] in kohya's format with `ss_*`/`modelspec.*`
//!   metadata ([`TrainingMetadata`]) and the `sshs_*` hashes, atomically.
//! * [`load_lora`]: reads kohya, AI Toolkit and diffusers/PEFT files and
//!   normalises them to one [`LoraSet`]; unknown keys are reported by name.
//! * [`LoraSummary`]: what `lorakit lora inspect` prints.
//! * [`LycoAdapter`]: LyCORIS' LoHa and LoKr (their maths, initialisation
//!   and file tensors), held in a [`LoraAdapter`] like a kohya pair, so sets,
//!   files and training take them as they take LoRAs.
//! * [`resize_set`]: rank reduction by truncated SVD (kohya's `resize_lora`),
//!   fixed or per-module ranks ([`RankRule`]); [`adapter_from_delta`]: a LoRA
//!   from a weight difference (extraction from two checkpoints).
//!
//! ```no_run
//! use lora_core::{Component, Geometry, LoraAdapter, LoraSet, ModuleKey, TrainingMetadata};
//! use tch::{Device, Kind};
//!
//! let mut set = LoraSet::new();
//! let key = ModuleKey::new(Component::Unet, "input_blocks.4.1.transformer_blocks.0.attn1.to_q");
//! set.insert(key, LoraAdapter::new(640, 640, 16, Some(16.0), Geometry::Linear, Kind::Float, Device::Cpu)?);
//! let meta = TrainingMetadata { output_name: "my_lora".into(), network_dim: 16, network_alpha: 16.0, ..Default::default() };
//! set.save("my_lora.safetensors", Kind::Half, &meta.to_map())?;
//! # Ok::<(), lora_core::LoraError>(())
//! ```

pub mod adapter;
pub mod dora;
pub mod dropout;
pub mod error;
mod factored;
pub mod formats;
pub mod geometry;
pub mod inspect;
pub mod io;
mod lora_pair;
pub mod lycoris;
pub mod metadata;
pub mod naming;
pub mod resize;
pub mod set;

pub use adapter::{Geometry, LoraAdapter};
pub use dropout::{BatchRows, Dropouts, ModuleSwitch};
pub use error::{LoraError, Result};
pub use formats::{load_lora, LoadedLora, LoraFormat, UnknownKeys};
pub use inspect::LoraSummary;
pub use lycoris::{factorization, LycoAdapter};
pub use metadata::{Prediction, TrainingMetadata};
pub use naming::{Component, ModuleKey};
pub use resize::{adapter_from_delta, resize_set, RankRule, ResizeOptions, ResizeStats};
pub use set::{LoraSet, SavedLora};

/// Tests that draw from torch's process-wide generator (seeded draws
/// compared across calls) hold this, so that tests running in parallel
/// threads do not draw in between.
#[cfg(test)]
pub(crate) fn test_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
