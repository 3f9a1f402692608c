//! Module naming: the single place where LoRA key spellings are mapped.
//!
//! Internally every adapter is addressed by a [`ModuleKey`]: a [`Component`]
//! (UNet, text encoder 1 = CLIP ViT-L, text encoder 2 = OpenCLIP bigG) plus the
//! module path with dots:
//!
//! * UNet paths use the original LDM/SGM layout, i.e. the single-file key
//!   without `model.diffusion_model.` (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`);
//! * text-encoder paths use the Hugging Face CLIP names
//!   (`text_model.encoder.layers.0.self_attn.q_proj`), which is what kohya uses
//!   for both encoders.
//!
//! On disk (kohya format) the name is `lora_unet_…` / `lora_te1_…` / `lora_te2_…`
//! with every `.` replaced by `_`. Going back needs a vocabulary of the
//! multi-word path segments, kept here in [`MULTI_WORD_SEGMENTS`].
//!
//! Diffusers-layout UNet paths (used by AI Toolkit and PEFT/diffusers files,
//! `down_blocks.1.attentions.0…`) are converted to the LDM layout by
//! [`diffusers_unet_to_ldm`], for the SDXL block layout (3 levels; 2 resnets per
//! down level, 3 per up level; every upsampling up-block has attention).

use std::fmt;

/// Which model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The SDXL UNet (LDM module paths).
    Unet,
    /// Text encoder 1: CLIP ViT-L/14 (HF `CLIPTextModel` paths).
    Te1,
    /// Text encoder 2: OpenCLIP ViT-bigG/14 (HF `CLIPTextModelWithProjection` paths).
    Te2,
}

impl Component {
    /// All components in file order.
    pub const ALL: [Component; 3] = [Component::Unet, Component::Te1, Component::Te2];

    /// kohya key prefix (`lora_unet`, `lora_te1`, `lora_te2`).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::Te1 => "lora_te1",
            Component::Te2 => "lora_te2",
        }
    }

    /// Short lower-case name (`unet`, `te1`, `te2`).
    pub fn short_name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Te1 => "te1",
            Component::Te2 => "te2",
        }
    }

    /// diffusers/PEFT state-dict prefix (`unet`, `text_encoder`, `text_encoder_2`).
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Te1 => "text_encoder",
            Component::Te2 => "text_encoder_2",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// The internal name of one adapted module.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleKey {
    /// The model the module lives in.
    pub component: Component,
    /// Dotted module path (LDM layout for the UNet, HF CLIP names for the text encoders).
    pub path: String,
}

impl ModuleKey {
    /// A key from a component and a dotted path.
    pub fn new(component: Component, path: impl Into<String>) -> Self {
        Self {
            component,
            path: path.into(),
        }
    }

    /// The kohya module name: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`.
    pub fn kohya_name(&self) -> String {
        format!(
            "{}_{}",
            self.component.kohya_prefix(),
            self.path.replace('.', "_")
        )
    }

    /// Parses a kohya module name (without the `.lora_down.weight` suffix).
    /// Accepts LDM and diffusers-layout UNet names (the latter are what AI
    /// Toolkit writes) and returns the key plus whether the name used the
    /// diffusers layout. `None` when the name is not a known module path.
    pub fn from_kohya_name(name: &str) -> Option<(ModuleKey, bool)> {
        let (component, rest) = if let Some(rest) = name.strip_prefix("lora_unet_") {
            (Component::Unet, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te1_") {
            (Component::Te1, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te2_") {
            (Component::Te2, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te_") {
            // SD1-style single text encoder name; SDXL's first encoder is the same CLIP-L.
            (Component::Te1, rest)
        } else {
            return None;
        };
        let dotted = underscores_to_path(rest);
        Self::from_path(component, &dotted)
    }

    /// Builds a key from a dotted path in either UNet layout (or a text
    /// encoder path), validating that it looks like a module of that component.
    /// Returns the key and whether the UNet path was in the diffusers layout.
    pub fn from_path(component: Component, dotted: &str) -> Option<(ModuleKey, bool)> {
        match component {
            Component::Unet => {
                if is_ldm_unet_path(dotted) {
                    Some((ModuleKey::new(component, dotted), false))
                } else {
                    diffusers_unet_to_ldm(dotted).map(|p| (ModuleKey::new(component, p), true))
                }
            }
            Component::Te1 | Component::Te2 => {
                let ok = dotted.starts_with("text_model.") || dotted == "text_projection";
                ok.then(|| (ModuleKey::new(component, dotted), false))
            }
        }
    }
}

impl fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kohya_name())
    }
}

/// Path segments that themselves contain `_`, longest first within each word
/// count. Everything not listed is a single word (`attn1`, `ff`, `net`, `op`…).
pub const MULTI_WORD_SEGMENTS: &[&str] = &[
    // LDM UNet
    "input_blocks",
    "middle_block",
    "output_blocks",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "time_embed",
    "label_emb",
    // diffusers UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_shortcut",
    "time_emb_proj",
    "time_embedding",
    "add_embedding",
    "linear_1",
    "linear_2",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    // CLIP (HF names)
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "text_projection",
    "token_embedding",
    "position_embedding",
];

/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q` → `input_blocks.4.1.transformer_blocks.0.attn1.to_q`.
pub fn underscores_to_path(name: &str) -> String {
    let words: Vec<&str> = name.split('_').collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let mut taken = 1;
        for n in (2..=3).rev() {
            if i + n <= words.len() {
                let joined = words[i..i + n].join("_");
                if MULTI_WORD_SEGMENTS.contains(&joined.as_str()) {
                    taken = n;
                    break;
                }
            }
        }
        out.push(words[i..i + taken].join("_"));
        i += taken;
    }
    out.join(".")
}

fn is_ldm_unet_path(p: &str) -> bool {
    let first = p.split('.').next().unwrap_or("");
    matches!(
        first,
        "input_blocks" | "middle_block" | "output_blocks" | "time_embed" | "label_emb" | "out"
    ) && p.contains('.')
}

fn resnet_inner_to_ldm(rest: &str) -> Option<String> {
    let (head, tail) = match rest.split_once('.') {
        Some((h, t)) => (h, Some(t)),
        None => (rest, None),
    };
    let mapped = match head {
        "conv1" => "in_layers.2",
        "norm1" => "in_layers.0",
        "conv2" => "out_layers.3",
        "norm2" => "out_layers.0",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(match tail {
        Some(t) => format!("{mapped}.{t}"),
        None => mapped.to_string(),
    })
}

fn num(s: &str) -> Option<usize> {
    s.parse().ok()
}

/// Converts a diffusers-layout SDXL UNet module path to the LDM layout.
/// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` →
/// `input_blocks.4.1.transformer_blocks.0.attn1.to_q`. `None` if the path is
/// not a diffusers UNet module path.
pub fn diffusers_unet_to_ldm(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let rest_from = |i: usize| parts[i..].join(".");
    match parts.as_slice() {
        ["down_blocks", b, kind, j, ..] => {
            let (b, j) = (num(b)?, num(j)?);
            match *kind {
                "resnets" if parts.len() > 4 => Some(format!(
                    "input_blocks.{}.0.{}",
                    1 + 3 * b + j,
                    resnet_inner_to_ldm(&rest_from(4))?
                )),
                "attentions" if parts.len() > 4 => {
                    Some(format!("input_blocks.{}.1.{}", 1 + 3 * b + j, rest_from(4)))
                }
                "downsamplers" if j == 0 && parts.get(4) == Some(&"conv") => {
                    let tail = if parts.len() > 5 {
                        format!(".{}", rest_from(5))
                    } else {
                        String::new()
                    };
                    Some(format!("input_blocks.{}.0.op{tail}", 3 * (b + 1)))
                }
                _ => None,
            }
        }
        ["mid_block", kind, j, ..] if parts.len() > 3 => {
            let j = num(j)?;
            match *kind {
                "resnets" => Some(format!(
                    "middle_block.{}.{}",
                    2 * j,
                    resnet_inner_to_ldm(&rest_from(3))?
                )),
                "attentions" if j == 0 => Some(format!("middle_block.1.{}", rest_from(3))),
                _ => None,
            }
        }
        ["up_blocks", b, kind, j, ..] => {
            let (b, j) = (num(b)?, num(j)?);
            match *kind {
                "resnets" if parts.len() > 4 => Some(format!(
                    "output_blocks.{}.0.{}",
                    3 * b + j,
                    resnet_inner_to_ldm(&rest_from(4))?
                )),
                "attentions" if parts.len() > 4 => {
                    Some(format!("output_blocks.{}.1.{}", 3 * b + j, rest_from(4)))
                }
                "upsamplers" if j == 0 && parts.get(4) == Some(&"conv") => {
                    let tail = if parts.len() > 5 {
                        format!(".{}", rest_from(5))
                    } else {
                        String::new()
                    };
                    Some(format!("output_blocks.{}.2.conv{tail}", 3 * b + 2))
                }
                _ => None,
            }
        }
        ["time_embedding", "linear_1", ..] => Some(format!("time_embed.0{}", suffix(&parts, 2))),
        ["time_embedding", "linear_2", ..] => Some(format!("time_embed.2{}", suffix(&parts, 2))),
        ["add_embedding", "linear_1", ..] => Some(format!("label_emb.0.0{}", suffix(&parts, 2))),
        ["add_embedding", "linear_2", ..] => Some(format!("label_emb.0.2{}", suffix(&parts, 2))),
        ["conv_in", ..] => Some(format!("input_blocks.0.0{}", suffix(&parts, 1))),
        ["conv_out", ..] => Some(format!("out.2{}", suffix(&parts, 1))),
        ["conv_norm_out", ..] => Some(format!("out.0{}", suffix(&parts, 1))),
        _ => None,
    }
}

fn suffix(parts: &[&str], from: usize) -> String {
    if parts.len() > from {
        format!(".{}", parts[from..].join("."))
    } else {
        String::new()
    }
}

/// Old diffusers attention-processor LoRA names (`attn1.processor.to_q_lora`,
/// `self_attn.to_q_lora`, `mlp.fc1.lora_linear_layer`) → module path of the
/// adapted Linear. Returns `None` when the path has no such pattern.
pub fn attn_processor_to_module(path: &str, component: Component) -> Option<String> {
    if let Some(base) = path
        .strip_suffix(".lora_linear_layer")
        .or_else(|| path.strip_suffix(".lora"))
    {
        return Some(base.to_string());
    }
    let (parent, last) = path.rsplit_once('.')?;
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let proj = last.strip_suffix("_lora")?;
    let mapped = match (component, proj) {
        (Component::Unet, "to_out") => "to_out.0",
        (Component::Unet, p @ ("to_q" | "to_k" | "to_v")) => p,
        (_, "to_q") => "q_proj",
        (_, "to_k") => "k_proj",
        (_, "to_v") => "v_proj",
        (_, "to_out") => "out_proj",
        _ => return None,
    };
    Some(format!("{parent}.{mapped}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names_round_trip() {
        for (c, p) in [
            (
                Component::Unet,
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (Component::Unet, "output_blocks.2.2.conv"),
            (Component::Unet, "input_blocks.3.0.op"),
            (
                Component::Unet,
                "middle_block.1.transformer_blocks.9.attn2.to_out.0",
            ),
            (
                Component::Unet,
                "output_blocks.0.1.transformer_blocks.3.ff.net.0.proj",
            ),
            (Component::Unet, "input_blocks.1.0.in_layers.2"),
            (Component::Unet, "input_blocks.1.0.emb_layers.1"),
            (Component::Unet, "input_blocks.4.0.skip_connection"),
            (Component::Unet, "input_blocks.4.1.proj_in"),
            (
                Component::Te1,
                "text_model.encoder.layers.0.self_attn.q_proj",
            ),
            (Component::Te2, "text_model.encoder.layers.31.mlp.fc2"),
        ] {
            let key = ModuleKey::new(c, p);
            let name = key.kohya_name();
            let (back, diffusers) = ModuleKey::from_kohya_name(&name).unwrap();
            assert_eq!(back, key, "{name}");
            assert!(!diffusers);
        }
        assert_eq!(
            ModuleKey::new(
                Component::Unet,
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
            )
            .kohya_name(),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            ModuleKey::new(Component::Te2, "text_model.encoder.layers.31.mlp.fc2").kohya_name(),
            "lora_te2_text_model_encoder_layers_31_mlp_fc2"
        );
    }

    #[test]
    fn diffusers_layout_maps_to_ldm() {
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.2.attentions.1.proj_out",
                "input_blocks.8.1.proj_out",
            ),
            (
                "down_blocks.0.resnets.1.conv1",
                "input_blocks.2.0.in_layers.2",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut",
                "input_blocks.4.0.skip_connection",
            ),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
            ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
            (
                "mid_block.resnets.1.time_emb_proj",
                "middle_block.2.emb_layers.1",
            ),
            (
                "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
                "middle_block.1.transformer_blocks.9.ff.net.2",
            ),
            (
                "up_blocks.0.resnets.2.conv2",
                "output_blocks.2.0.out_layers.3",
            ),
            (
                "up_blocks.1.attentions.2.proj_in",
                "output_blocks.5.1.proj_in",
            ),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
            ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
            (
                "up_blocks.2.resnets.0.conv_shortcut",
                "output_blocks.6.0.skip_connection",
            ),
            ("time_embedding.linear_1", "time_embed.0"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_in", "input_blocks.0.0"),
            ("conv_out", "out.2"),
        ];
        for (d, l) in cases {
            assert_eq!(diffusers_unet_to_ldm(d).as_deref(), Some(l), "{d}");
            let kohya = format!("lora_unet_{}", d.replace('.', "_"));
            let (key, diffusers) = ModuleKey::from_kohya_name(&kohya).unwrap();
            assert_eq!(key.path, l, "{kohya}");
            assert!(diffusers);
        }
        assert_eq!(diffusers_unet_to_ldm("down_blocks.x.resnets.0.conv1"), None);
        assert_eq!(diffusers_unet_to_ldm("foo.bar"), None);
    }

    #[test]
    fn unknown_names_are_rejected() {
        assert!(ModuleKey::from_kohya_name("lora_unet_something_else").is_none());
        assert!(ModuleKey::from_kohya_name("lora_te1_foo").is_none());
        assert!(ModuleKey::from_kohya_name("hada_w1_a").is_none());
    }

    #[test]
    fn attn_processor_names() {
        assert_eq!(
            attn_processor_to_module(
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
                Component::Unet
            )
            .as_deref(),
            Some("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")
        );
        assert_eq!(
            attn_processor_to_module(
                "text_model.encoder.layers.0.self_attn.to_k_lora",
                Component::Te1
            )
            .as_deref(),
            Some("text_model.encoder.layers.0.self_attn.k_proj")
        );
        assert_eq!(
            attn_processor_to_module(
                "text_model.encoder.layers.0.mlp.fc1.lora_linear_layer",
                Component::Te2
            )
            .as_deref(),
            Some("text_model.encoder.layers.0.mlp.fc1")
        );
    }
}
