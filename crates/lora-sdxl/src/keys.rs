//! Single-file checkpoint key layout: the one place that knows where each
//! component's tensors live in an SDXL `.safetensors` checkpoint.

use lora_core::{Component, ModuleKey};

/// Prefix of UNet keys (`model.diffusion_model.`).
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of text encoder 1 (HF CLIP ViT-L) keys.
pub const TE1_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of text encoder 2 (OpenCLIP ViT-bigG) keys.
pub const TE2_PREFIX: &str = "conditioner.embedders.1.model.";
/// Prefix of VAE keys.
pub const VAE_PREFIX: &str = "first_stage_model.";

/// Where the base weight of an adapted module is stored in a single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightLocation {
    /// Checkpoint key of the weight tensor.
    pub key: String,
    /// For OpenCLIP's fused `in_proj_weight`: which third (0 = q, 1 = k, 2 = v).
    pub fused_part: Option<usize>,
}

/// The checkpoint key holding the weight of a LoRA target module.
/// Text encoder 2 uses OpenCLIP names in single files, so its HF-style
/// module paths are mapped (`self_attn.q_proj` → third 0 of `attn.in_proj_weight`,
/// `mlp.fc1` → `mlp.c_fc`, `mlp.fc2` → `mlp.c_proj`).
pub fn weight_location(key: &ModuleKey) -> Option<WeightLocation> {
    let plain = |k: String| {
        Some(WeightLocation {
            key: k,
            fused_part: None,
        })
    };
    match key.component {
        Component::Unet => plain(format!("{UNET_PREFIX}{}.weight", key.path)),
        Component::Te1 => plain(format!("{TE1_PREFIX}{}.weight", key.path)),
        Component::Te2 => {
            if key.path == "text_projection" {
                return plain(format!("{TE2_PREFIX}text_projection"));
            }
            let rest = key.path.strip_prefix("text_model.encoder.layers.")?;
            let (layer, module) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let block = format!("{TE2_PREFIX}transformer.resblocks.{layer}");
            let fused = |part| {
                Some(WeightLocation {
                    key: format!("{block}.attn.in_proj_weight"),
                    fused_part: Some(part),
                })
            };
            match module {
                "self_attn.q_proj" => fused(0),
                "self_attn.k_proj" => fused(1),
                "self_attn.v_proj" => fused(2),
                "self_attn.out_proj" => plain(format!("{block}.attn.out_proj.weight")),
                "mlp.fc1" => plain(format!("{block}.mlp.c_fc.weight")),
                "mlp.fc2" => plain(format!("{block}.mlp.c_proj.weight")),
                _ => None,
            }
        }
    }
}
