//! Attaching LoRAs to a loaded model: each module of a [`LoraSet`] goes to the
//! slot of the layer it adapts (kohya names, [`super::targets`]), checked
//! against the layer's shape and kind, without touching the base weights.

use super::nn::Slots;
use super::sdxl::SdxlModel;
use crate::error::{Result, SdxlError};
use lora_core::{Component, LoraSet};
use tch::{Device, Kind};

/// How a LoRA attached to a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// Modules per component.
    pub modules: Vec<(Component, usize)>,
}

impl SdxlModel {
    /// Attaches every module of `set` at `strength` (kohya semantics:
    /// `W·x + strength·alpha/rank·up(down(x))`), without touching the base
    /// weights. A module the model does not have, or whose shape does not
    /// match, is an error naming it (a LoRA for another architecture).
    pub fn attach_lora(&self, set: LoraSet, strength: f64) -> Result<Attached> {
        attach(&self.slots, set, strength, self.unet_device())
    }
    /// Removes every attached LoRA.
    pub fn detach_loras(&self) {
        self.slots.clear();
    }
}

/// [`SdxlModel::attach_lora`] over any slot registry.
pub fn attach(slots: &Slots, set: LoraSet, strength: f64, device: Device) -> Result<Attached> {
    let mut problems = Vec::new();
    let mut counts: std::collections::BTreeMap<Component, usize> = Default::default();
    let mut ready = Vec::new();
    let mut set = set;
    let keys: Vec<_> = set.iter().map(|(k, _)| k.clone()).collect();
    for key in keys {
        let adapter = set.remove(&key).expect("key listed above");
        let Some(info) = slots.get(&key) else {
            problems.push(format!(
                "`{}` is not a module of this model",
                key.kohya_name()
            ));
            continue;
        };
        if adapter.out_features() != info.out_features {
            problems.push(format!(
                "`{}` has {} outputs in the LoRA but {} in the model",
                key.kohya_name(),
                adapter.out_features(),
                info.out_features
            ));
            continue;
        }
        // the adapter itself, moved: its dropouts and other settings stay
        let mut a = adapter.to_device_kind(device, Kind::Float);
        if let Err(e) = a.fit_layer(info.in_features, info.geometry) {
            problems.push(format!("`{}`: {e}", key.kohya_name()));
            continue;
        }
        a.set_multiplier(strength);
        *counts.entry(key.component).or_default() += 1;
        ready.push((info.slot, a));
    }
    if !problems.is_empty() {
        return Err(SdxlError::Lora(lora_core::LoraError::Invalid(format!(
            "the LoRA does not fit this model: {} problem(s): {}{}",
            problems.len(),
            problems
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
            if problems.len() > 5 { "; …" } else { "" }
        ))));
    }
    for (slot, a) in ready {
        slot.push(a);
    }
    Ok(Attached {
        modules: counts.into_iter().collect(),
    })
}
