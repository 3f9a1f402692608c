//! Model configurations read off a checkpoint: the UNet's levels and
//! transformer depths, each text encoder's width and depth, the VAE's
//! channels, from the keys and shapes of a single-file checkpoint (no
//! tensor is read). The configs themselves are in [`super::config`].

use crate::model::config::{ClipConfig, ClipLayout, UnetConfig, VaeConfig};
use crate::model::weights::Checkpoint;

impl UnetConfig {
    /// Infers the configuration from the keys and shapes of a checkpoint
    /// (`prefix` = `model.diffusion_model.`). Assumes SDXL's layout: 2 resnets
    /// per down level, GroupNorm 32, 64-channel heads.
    pub fn infer(ck: &Checkpoint, prefix: &str) -> Option<Self> {
        let shape = |k: &str| ck.shape(&format!("{prefix}{k}")).map(|s| s.to_vec());
        let conv_in = shape("input_blocks.0.0.weight")?;
        let mc = conv_in[0];
        let nrb = 2;
        let mut channel_mult = Vec::new();
        let mut transformer_depth = Vec::new();
        for l in 0.. {
            let idx = 1 + l * (nrb + 1);
            let Some(w) = shape(&format!("input_blocks.{idx}.0.out_layers.3.weight")) else {
                break;
            };
            channel_mult.push(w[0] / mc);
            transformer_depth.push(count_blocks(
                ck,
                &format!("{prefix}input_blocks.{idx}.1.transformer_blocks."),
            ));
        }
        if channel_mult.is_empty() {
            return None;
        }
        let depth_mid = count_blocks(ck, &format!("{prefix}middle_block.1.transformer_blocks."));
        let context_dim = ck
            .infos()
            .iter()
            .find(|(k, _)| k.starts_with(prefix) && k.ends_with("attn2.to_k.weight"))
            .map(|(_, i)| i.shape[1])
            .unwrap_or(2048);
        Some(Self {
            in_channels: conv_in[1],
            out_channels: shape("out.2.weight")?[0],
            model_channels: mc,
            channel_mult,
            num_res_blocks: nrb,
            transformer_depth,
            transformer_depth_middle: depth_mid,
            head_dim: 64,
            context_dim,
            adm_in_channels: shape("label_emb.0.0.weight")?[1],
            norm_groups: 32,
        })
    }
}

fn count_blocks(ck: &Checkpoint, prefix: &str) -> i64 {
    ck.infos()
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .max()
        .map(|m| m + 1)
        .unwrap_or(0)
}

impl ClipConfig {
    /// Infers a text encoder's configuration from a checkpoint. `prefix` is
    /// `conditioner.embedders.0.transformer.` (HF layout) or
    /// `conditioner.embedders.1.model.` (OpenCLIP layout). Heads are 64 wide.
    pub fn infer(ck: &Checkpoint, prefix: &str, layout: ClipLayout) -> Option<Self> {
        let shape = |k: &str| ck.shape(&format!("{prefix}{k}")).map(|s| s.to_vec());
        let (tok, pos, layer_prefix, fc1, proj) = match layout {
            ClipLayout::HuggingFace => (
                "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight",
                "text_model.encoder.layers.",
                "text_model.encoder.layers.0.mlp.fc1.weight",
                shape("text_projection.weight").map(|s| s[0]),
            ),
            ClipLayout::OpenClip => (
                "token_embedding.weight",
                "positional_embedding",
                "transformer.resblocks.",
                "transformer.resblocks.0.mlp.c_fc.weight",
                shape("text_projection").map(|s| s[1]),
            ),
        };
        let t = shape(tok)?;
        let hidden = t[1];
        Some(Self {
            vocab_size: t[0],
            hidden,
            intermediate: shape(fc1)?[0],
            layers: count_blocks(ck, &format!("{prefix}{layer_prefix}")),
            heads: (hidden / 64).max(1),
            max_positions: shape(pos)?[0],
            projection_dim: proj,
        })
    }
}

impl VaeConfig {
    /// Infers the VAE configuration from a checkpoint (`prefix` = `first_stage_model.`).
    pub fn infer(ck: &Checkpoint, prefix: &str) -> Option<Self> {
        let shape = |k: &str| ck.shape(&format!("{prefix}{k}")).map(|s| s.to_vec());
        let base = shape("encoder.conv_in.weight")?[0];
        let mut channel_mult = Vec::new();
        while let Some(s) = shape(&format!(
            "encoder.down.{}.block.0.conv2.weight",
            channel_mult.len()
        )) {
            channel_mult.push(s[0] / base);
        }
        Some(Self {
            base_channels: base,
            num_res_blocks: count_blocks(ck, &format!("{prefix}encoder.down.0.block.")),
            channel_mult,
            latent_channels: shape("decoder.conv_in.weight")?[1],
            scaling_factor: 0.13025,
        })
    }
}
