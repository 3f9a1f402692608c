//! A set of adapters addressed by [`ModuleKey`], saved in kohya's format.

use crate::adapter::LoraAdapter;
use crate::error::{LoraError, Result};
use crate::io;
use crate::naming::{Component, ModuleKey};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Adapters by module, in kohya's on-disk order.
#[derive(Debug, Default)]
pub struct LoraSet {
    modules: BTreeMap<ModuleKey, LoraAdapter>,
}

/// Result of a save: the hashes A1111 shows and the file size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedLora {
    /// `sshs_model_hash` (sha256 of the data section).
    pub model_hash: String,
    /// `sshs_legacy_hash`.
    pub legacy_hash: String,
    /// Bytes written.
    pub size: u64,
}

impl LoraSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) the adapter of a module.
    pub fn insert(&mut self, key: ModuleKey, adapter: LoraAdapter) -> Option<LoraAdapter> {
        self.modules.insert(key, adapter)
    }
    /// The adapter of a module.
    pub fn get(&self, key: &ModuleKey) -> Option<&LoraAdapter> {
        self.modules.get(key)
    }
    /// The adapter of a module, mutably.
    pub fn get_mut(&mut self, key: &ModuleKey) -> Option<&mut LoraAdapter> {
        self.modules.get_mut(key)
    }
    /// Removes a module's adapter.
    pub fn remove(&mut self, key: &ModuleKey) -> Option<LoraAdapter> {
        self.modules.remove(key)
    }
    /// Modules in order.
    pub fn iter(&self) -> impl Iterator<Item = (&ModuleKey, &LoraAdapter)> {
        self.modules.iter()
    }
    /// Modules in order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ModuleKey, &mut LoraAdapter)> {
        self.modules.iter_mut()
    }
    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }
    /// True when no module is adapted.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
    /// Number of modules of one component.
    pub fn count(&self, component: Component) -> usize {
        self.modules
            .keys()
            .filter(|k| k.component == component)
            .count()
    }
    /// All trainable tensors of every module, in module order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        self.modules.values().flat_map(|a| a.parameters()).collect()
    }
    /// Total number of adapter parameters.
    pub fn num_parameters(&self) -> i64 {
        self.parameters().iter().map(|t| t.numel() as i64).sum()
    }
    /// Sets the strength of every adapter.
    pub fn set_multiplier(&mut self, m: f64) {
        for a in self.modules.values_mut() {
            a.set_multiplier(m);
        }
    }

    /// The kohya state dict: `<name>.lora_down.weight`, `<name>.lora_up.weight`
    /// (or LyCORIS' `<name>.hada_w1_a`, `<name>.lokr_w1`, …) and a 0-dim
    /// `<name>.alpha` per module, every tensor cast to `kind`, on CPU.
    pub fn kohya_tensors(&self, kind: Kind) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.modules.len() * 3);
        for (key, a) in &self.modules {
            let name = key.kohya_name();
            let cast = |t: &Tensor| t.detach().to_device(Device::Cpu).to_kind(kind).contiguous();
            out.push((
                format!("{name}.alpha"),
                Tensor::scalar_tensor(a.alpha(), (kind, Device::Cpu)),
            ));
            for (suffix, t) in a.named_tensors() {
                out.push((format!("{name}.{suffix}"), cast(t)));
            }
        }
        out
    }

    /// Saves in kohya format with `metadata`, adding `sshs_model_hash` and
    /// `sshs_legacy_hash` computed as kohya does (over the file serialised
    /// with only the `ss_*` keys). Atomic: temp file, fsync, rename.
    pub fn save(
        &self,
        path: impl AsRef<Path>,
        kind: Kind,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SavedLora> {
        let path = path.as_ref();
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(LoraError::Invalid(format!(
                "LoRA files are saved as fp32, fp16 or bf16, not {kind:?}"
            )));
        }
        let raw: Vec<_> = self
            .kohya_tensors(kind)
            .into_iter()
            .map(|(n, t)| io::tensor_bytes(&t).map(|(d, s, b)| (n, d, s, b)))
            .collect::<Result<_>>()?;
        let ss_only: BTreeMap<String, String> = metadata
            .iter()
            .filter(|(k, _)| k.starts_with("ss_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let for_hash = io::serialize_raw(&raw, &ss_only)?;
        let model_hash = io::addnet_hash(&for_hash);
        let legacy_hash = io::legacy_hash(&for_hash);
        drop(for_hash);
        let mut full = metadata.clone();
        full.insert("sshs_model_hash".into(), model_hash.clone());
        full.insert("sshs_legacy_hash".into(), legacy_hash.clone());
        let bytes = io::serialize_raw(&raw, &full)?;
        io::write_atomic(path, &bytes)?;
        tracing::debug!(path = %path.display(), modules = self.len(), bytes = bytes.len(), "saved LoRA");
        Ok(SavedLora {
            model_hash,
            legacy_hash,
            size: bytes.len() as u64,
        })
    }
}
