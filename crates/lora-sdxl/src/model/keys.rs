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

/// [`weight_location`] for a checkpoint whose text encoder 2 is stored in
/// `te2_layout` (Hugging Face names when it came from a diffusers folder).
pub fn weight_location_in(
    key: &ModuleKey,
    te2_layout: crate::model::config::ClipLayout,
) -> Option<WeightLocation> {
    match (key.component, te2_layout) {
        (Component::Te2, crate::model::config::ClipLayout::HuggingFace) => Some(WeightLocation {
            key: format!("{TE2_HF_PREFIX}{}.weight", key.path),
            fused_part: None,
        }),
        _ => weight_location(key),
    }
}

/// Where a text encoder 2 in Hugging Face layout (from a diffusers folder) is
/// presented (single files use OpenCLIP names under [`TE2_PREFIX`]).
pub const TE2_HF_PREFIX: &str = "conditioner.embedders.1.transformer.";

/// diffusers folder components and their weight file base names.
pub const DIFFUSERS_COMPONENTS: [(&str, &str); 4] = [
    ("unet", "diffusion_pytorch_model"),
    ("text_encoder", "model"),
    ("text_encoder_2", "model"),
    ("vae", "diffusion_pytorch_model"),
];

/// The single-file key of a diffusers component's key. `vae_levels` is the
/// number of VAE levels (diffusers counts decoder blocks from the top).
pub fn diffusers_to_single_file(component: &str, key: &str, vae_levels: usize) -> Option<String> {
    match component {
        "unet" => {
            let (module, param) = key.rsplit_once('.')?;
            let ldm = lora_core::naming::diffusers_unet_to_ldm(module)?;
            Some(format!("{UNET_PREFIX}{ldm}.{param}"))
        }
        "text_encoder" => Some(format!("{TE1_PREFIX}{key}")),
        "text_encoder_2" => Some(format!("{TE2_HF_PREFIX}{key}")),
        "vae" => vae_diffusers_to_ldm(key, vae_levels).map(|k| format!("{VAE_PREFIX}{k}")),
        _ => None,
    }
}

fn vae_resnet_param(rest: &[&str]) -> String {
    let mut v: Vec<&str> = rest.to_vec();
    if v.first() == Some(&"conv_shortcut") {
        v[0] = "nin_shortcut";
    }
    v.join(".")
}

/// diffusers `AutoencoderKL` key → LDM `first_stage_model` key (without prefix).
pub fn vae_diffusers_to_ldm(key: &str, levels: usize) -> Option<String> {
    let p: Vec<&str> = key.split('.').collect();
    match p.as_slice() {
        ["quant_conv" | "post_quant_conv", ..] => Some(key.to_string()),
        [side @ ("encoder" | "decoder"), rest @ ..] => {
            let body = match rest {
                ["conv_in" | "conv_out", ..] => rest.join("."),
                ["conv_norm_out", tail @ ..] => format!("norm_out.{}", tail.join(".")),
                ["mid_block", "resnets", j, tail @ ..] => {
                    format!(
                        "mid.block_{}.{}",
                        j.parse::<usize>().ok()? + 1,
                        vae_resnet_param(tail)
                    )
                }
                ["mid_block", "attentions", "0", name, tail @ ..] => {
                    let (ldm, tail) = match *name {
                        "group_norm" => ("norm", tail),
                        "to_q" | "query" => ("q", tail),
                        "to_k" | "key" => ("k", tail),
                        "to_v" | "value" => ("v", tail),
                        "to_out" => ("proj_out", tail.get(1..)?),
                        "proj_attn" => ("proj_out", tail),
                        _ => return None,
                    };
                    format!("mid.attn_1.{ldm}.{}", tail.join("."))
                }
                [blocks @ ("down_blocks" | "up_blocks"), i, kind, j, tail @ ..] => {
                    let i: usize = i.parse().ok()?;
                    let (group, level) = if *blocks == "down_blocks" {
                        ("down", i)
                    } else {
                        ("up", levels.checked_sub(1 + i)?)
                    };
                    match *kind {
                        "resnets" => {
                            format!("{group}.{level}.block.{j}.{}", vae_resnet_param(tail))
                        }
                        "downsamplers" => format!("{group}.{level}.downsample.{}", tail.join(".")),
                        "upsamplers" => format!("{group}.{level}.upsample.{}", tail.join(".")),
                        _ => return None,
                    }
                }
                _ => return None,
            };
            Some(format!("{side}.{body}"))
        }
        _ => None,
    }
}
