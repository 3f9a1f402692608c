//! Baking LoRAs into a checkpoint (what kohya's `sdxl_merge_lora.py` does):
//! `W ← W + Σ strengthᵢ·ΔWᵢ` for every module the LoRAs adapt, written as a
//! new single-file checkpoint tensor by tensor (one merged tensor in memory
//! at a time; every other tensor is copied byte for byte from the mapping),
//! atomically (temp file, fsync, rename).
//!
//! ```no_run
//! use lora_core::{load_lora, UnknownKeys};
//! use lora_sdxl::merge_into_checkpoint;
//! use std::path::Path;
//!
//! let style = load_lora("style.safetensors", UnknownKeys::Reject)?.set;
//! let character = load_lora("character.safetensors", UnknownKeys::Reject)?.set;
//! let report = merge_into_checkpoint(
//!     Path::new("sdxl.safetensors"),
//!     &[(&style, 0.6), (&character, 0.8)],
//!     Path::new("baked.safetensors"),
//!     Default::default(),
//! )?;
//! println!("{} tensors changed", report.merged_tensors);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::model::keys::weight_location_in;
use crate::model::sdxl::detect;
use crate::model::weights::{Checkpoint, TensorInfo};
use crate::{Result, SdxlError};
use lora_core::{LoraAdapter, LoraSet};
use safetensors::tensor::View;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind};

/// What [`merge_into_checkpoint`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Checkpoint tensors that were changed.
    pub merged_tensors: usize,
    /// LoRA modules merged (over all LoRAs).
    pub modules: usize,
    /// Tensors written in all.
    pub tensors: usize,
    /// Size of the written file.
    pub bytes: u64,
}

/// One LoRA module's contribution to a checkpoint tensor.
struct Part<'a> {
    /// For OpenCLIP's fused `in_proj_weight`: which third.
    fused: Option<usize>,
    adapter: &'a LoraAdapter,
    strength: f64,
}

struct Entry<'a> {
    ck: &'a Checkpoint,
    key: String,
    info: TensorInfo,
    shape: Vec<usize>,
    parts: Vec<Part<'a>>,
}

impl View for &Entry<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        lora_core::io::dtype_of(self.info.kind).expect("checkpoint dtypes are float types")
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let raw = self.ck.raw(&self.key).expect("key from this checkpoint");
        if self.parts.is_empty() {
            return Cow::Borrowed(raw);
        }
        // shapes were checked when planning
        let w = self
            .ck
            .load(&self.key, Kind::Float, Device::Cpu)
            .expect("key from this checkpoint");
        for p in &self.parts {
            // the module's part of the tensor (a third of OpenCLIP's fused in_proj)
            let mut target = match p.fused {
                Some(i) => {
                    let n = p.adapter.out_features();
                    w.narrow(0, i as i64 * n, n)
                }
                None => w.shallow_clone(),
            };
            // merged_weight: W + s·ΔW, or DoRA's W + s·(W' − W); a LyCORIS
            // update read from a file (its matrix) is viewed as the weight
            let merged = p
                .adapter
                .merged_weight(&target, p.strength)
                .expect("shapes were checked when planning");
            target.copy_(&merged);
        }
        let (_, _, bytes) = lora_core::io::tensor_bytes(&w.to_kind(self.info.kind))
            .expect("a float tensor serialises");
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.ck.raw(&self.key).map_or(0, <[u8]>::len)
    }
}

/// Writes `out`: the single-file checkpoint `base` with every LoRA of
/// `loras` merged at its strength. Fails before writing anything when a
/// LoRA module has no matching weight (a LoRA for another model) or
/// shapes disagree. The tensors keep their stored dtypes (merging runs in
/// fp32). `metadata` is written as the file's `__metadata__`.
pub fn merge_into_checkpoint(
    base: &Path,
    loras: &[(&LoraSet, f64)],
    out: &Path,
    metadata: BTreeMap<String, String>,
) -> Result<MergeReport> {
    let ck = Checkpoint::open(base)?;
    let err = |reason: String| SdxlError::Checkpoint {
        path: base.to_path_buf(),
        reason,
    };
    if ck.is_folder() {
        return Err(err(
            "merging writes a single-file checkpoint: pass a single-file .safetensors as the base"
                .into(),
        ));
    }
    let detected = detect(&ck)?;
    let mut plan: BTreeMap<String, Vec<Part>> = BTreeMap::new();
    let mut modules = 0;
    for (set, strength) in loras {
        for (key, adapter) in set.iter() {
            let name = key.kohya_name();
            let loc = weight_location_in(key, detected.te2_layout).ok_or_else(|| {
                err(format!(
                    "LoRA module {name} has no place in an SDXL checkpoint"
                ))
            })?;
            let shape = ck.shape(&loc.key).ok_or_else(|| {
                err(format!(
                    "LoRA module {name} needs `{}`, which this checkpoint lacks: is the LoRA for another model?",
                    loc.key
                ))
            })?;
            // a fused in_proj holds three modules' rows
            let mut part = shape.to_vec();
            if loc.fused_part.is_some() {
                part[0] /= 3;
            }
            if !adapter.fits_weight(&part) {
                let mut want = adapter.weight_shape();
                if loc.fused_part.is_some() {
                    want[0] *= 3;
                }
                return Err(err(format!(
                    "LoRA module {name} changes a {want:?} weight but `{}` is {shape:?}: is the LoRA for another model?",
                    loc.key
                )));
            }
            plan.entry(loc.key).or_default().push(Part {
                fused: loc.fused_part,
                adapter,
                strength: *strength,
            });
            modules += 1;
        }
    }
    let entries: Vec<Entry> = ck
        .infos()
        .iter()
        .map(|(key, info)| Entry {
            ck: &ck,
            key: key.clone(),
            info: info.clone(),
            shape: info.shape.iter().map(|&d| d as usize).collect(),
            parts: plan.remove(key).unwrap_or_default(),
        })
        .collect();
    let merged_tensors = entries.iter().filter(|e| !e.parts.is_empty()).count();
    for e in &entries {
        if lora_core::io::dtype_of(e.info.kind).is_none() {
            return Err(err(format!("`{}` has a dtype lorakit cannot write", e.key)));
        }
    }
    let meta: HashMap<String, String> = metadata.into_iter().collect();
    lora_core::io::replace_atomic(out, |tmp| {
        safetensors::tensor::serialize_to_file(
            entries.iter().map(|e| (e.key.clone(), e)),
            (!meta.is_empty()).then_some(meta),
            tmp,
        )
        .map_err(std::io::Error::other)
    })?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    tracing::info!(out = %out.display(), merged_tensors, modules, "merged LoRAs into checkpoint");
    Ok(MergeReport {
        merged_tensors,
        modules,
        tensors: entries.len(),
        bytes,
    })
}
