//! Random SDXL-architecture checkpoints in the real single-file layout, for
//! the built-in demo and for tests that need a full CLIP vocabulary (no
//! weights can be downloaded here), and random LoRAs for them.

use crate::error::Result;
use crate::model::config::SdxlConfig;
use crate::model::sdxl::expected_keys;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Writes a checkpoint for `cfg` with random weights (seeded): matrices
/// ~N(0, 1/fan_in), norm weights ~1, biases small; stored as `kind`.
/// Also writes the `position_ids` / `logit_scale` buffers real files carry.
pub fn write_random_checkpoint(
    path: &Path,
    cfg: &SdxlConfig,
    seed: i64,
    kind: Kind,
) -> Result<u64> {
    tch::manual_seed(seed);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (key, shape) in expected_keys(cfg) {
        let opts = (Kind::Float, Device::Cpu);
        let t = if shape.len() >= 2 {
            let fan_in: i64 = shape[1..].iter().product();
            Tensor::randn(shape.as_slice(), opts) / (fan_in as f64).sqrt()
        } else if key.ends_with("weight") && !key.contains("embedding") {
            Tensor::randn(shape.as_slice(), opts) * 0.05 + 1.0
        } else {
            Tensor::randn(shape.as_slice(), opts) * 0.02
        };
        tensors.push((key, t.to_kind(kind)));
    }
    tensors.push((
        format!(
            "{}text_model.embeddings.position_ids",
            crate::model::keys::TE1_PREFIX
        ),
        Tensor::arange(cfg.te1.max_positions, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    ));
    tensors.push((
        format!("{}logit_scale", crate::model::keys::TE2_PREFIX),
        Tensor::from(4.6052f32).to_kind(kind),
    ));
    let bytes = lora_core::io::serialize(&tensors, &Default::default())?;
    lora_core::io::write_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// A LoRA with random weights on every target of `cfg` in `scope`:
/// kohya-initialised `down`, `up` ~ N(0, up_std²) (so ΔW ≠ 0), alpha =
/// rank; `rank` for Linear and 1x1 modules, `conv_rank` for kxk convs.
/// Draws from torch's global generator (seed it with `tch::manual_seed`).
pub fn random_lora(
    cfg: &SdxlConfig,
    scope: crate::model::targets::TargetScope,
    rank: i64,
    conv_rank: i64,
    up_std: f64,
) -> Result<lora_core::LoraSet> {
    let mut set = lora_core::LoraSet::new();
    for t in crate::model::targets::lora_targets(cfg, scope) {
        let r = if t.uses_conv_rank() { conv_rank } else { rank };
        let mut a = lora_core::LoraAdapter::new(
            t.in_features,
            t.out_features,
            r,
            None,
            t.geometry,
            Kind::Float,
            Device::Cpu,
        )?;
        let up = Tensor::randn(
            a.up().unwrap().size().as_slice(),
            (Kind::Float, Device::Cpu),
        ) * up_std;
        a.set_weights(a.down().unwrap().shallow_clone(), up)?;
        set.insert(t.key, a);
    }
    Ok(set)
}
