//! Plain configuration structs of the SDXL components.
//!
//! [`SdxlConfig::base()`] is SDXL 1.0 (and its fine-tunes: Illustrious, Pony,
//! NoobAI…); [`SdxlConfig::tiny()`] has the same structure and key names with
//! small widths, for tests and the built-in demo.

/// UNet (LDM layout) hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    /// Latent channels in (4).
    pub in_channels: i64,
    /// Latent channels out (4).
    pub out_channels: i64,
    /// Base width (320).
    pub model_channels: i64,
    /// Width multiplier per level (`[1, 2, 4]`).
    pub channel_mult: Vec<i64>,
    /// Resnets per down level (2); up levels have one more.
    pub num_res_blocks: i64,
    /// Transformer blocks per level (`[0, 2, 10]`); 0 = no attention at that level.
    pub transformer_depth: Vec<i64>,
    /// Transformer blocks in the middle block (10).
    pub transformer_depth_middle: i64,
    /// Attention head width: 64 in SDXL; lorakit uses `channels / 64` heads
    /// (one head below 64 channels), which is what makes widths alone enough
    /// to load a checkpoint.
    pub head_dim: i64,
    /// Cross-attention context width (2048 = 768 + 1280).
    pub context_dim: i64,
    /// Width of the `y` vector fed to `label_emb` (2816 = 1280 pooled + 6×256).
    pub adm_in_channels: i64,
    /// GroupNorm groups (32 in SDXL; widths must be multiples of it).
    pub norm_groups: i64,
}

impl UnetConfig {
    /// Time-embedding width (4 × model channels).
    pub fn time_embed_dim(&self) -> i64 {
        4 * self.model_channels
    }
    /// Channels at level `l`.
    pub fn level_channels(&self, l: usize) -> i64 {
        self.model_channels * self.channel_mult[l]
    }
    /// Number of levels.
    pub fn levels(&self) -> usize {
        self.channel_mult.len()
    }
}

/// A CLIP text transformer (HF `CLIPTextModel` naming).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Token vocabulary size (49408).
    pub vocab_size: i64,
    /// Hidden width (768 for CLIP-L, 1280 for bigG).
    pub hidden: i64,
    /// MLP width (3072 / 5120).
    pub intermediate: i64,
    /// Transformer layers (12 / 32).
    pub layers: i64,
    /// Attention heads (12 / 20).
    pub heads: i64,
    /// Context length (77).
    pub max_positions: i64,
    /// Output projection width for the pooled vector (bigG: 1280), if any.
    pub projection_dim: Option<i64>,
}

/// VAE (LDM `first_stage_model`) hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Base width (128).
    pub base_channels: i64,
    /// Width multiplier per level (`[1, 2, 4, 4]`).
    pub channel_mult: Vec<i64>,
    /// Resnets per level (2; the decoder uses one more).
    pub num_res_blocks: i64,
    /// Latent channels (4).
    pub latent_channels: i64,
    /// SDXL latent scale (0.13025).
    pub scaling_factor: f64,
}

/// The whole SDXL family model.
#[derive(Debug, Clone, PartialEq)]
pub struct SdxlConfig {
    /// UNet.
    pub unet: UnetConfig,
    /// Text encoder 1 (CLIP ViT-L/14).
    pub te1: ClipConfig,
    /// Text encoder 2 (OpenCLIP ViT-bigG/14).
    pub te2: ClipConfig,
    /// VAE.
    pub vae: VaeConfig,
}

impl SdxlConfig {
    /// SDXL 1.0 base.
    pub fn base() -> Self {
        Self {
            unet: UnetConfig {
                in_channels: 4,
                out_channels: 4,
                model_channels: 320,
                channel_mult: vec![1, 2, 4],
                num_res_blocks: 2,
                transformer_depth: vec![0, 2, 10],
                transformer_depth_middle: 10,
                head_dim: 64,
                context_dim: 2048,
                adm_in_channels: 2816,
                norm_groups: 32,
            },
            te1: ClipConfig {
                vocab_size: 49408,
                hidden: 768,
                intermediate: 3072,
                layers: 12,
                heads: 12,
                max_positions: 77,
                projection_dim: None,
            },
            te2: ClipConfig {
                vocab_size: 49408,
                hidden: 1280,
                intermediate: 5120,
                layers: 32,
                heads: 20,
                max_positions: 77,
                projection_dim: Some(1280),
            },
            vae: VaeConfig {
                base_channels: 128,
                channel_mult: vec![1, 2, 4, 4],
                num_res_blocks: 2,
                latent_channels: 4,
                scaling_factor: 0.13025,
            },
        }
    }

    /// A tiny model with SDXL's exact structure and key names (3 levels,
    /// attention on levels 1–2, both text encoders with CLIP's full vocabulary,
    /// 4-level VAE) but small widths and depths, for tests and the demo. It
    /// follows SDXL's fixed rules (64-channel heads, GroupNorm 32), so a file
    /// written for it loads with no config.
    pub fn tiny() -> Self {
        let te1 = ClipConfig {
            vocab_size: 49408,
            hidden: 32,
            intermediate: 64,
            layers: 3,
            heads: 1,
            max_positions: 77,
            projection_dim: None,
        };
        let te2 = ClipConfig {
            vocab_size: 49408,
            hidden: 32,
            intermediate: 64,
            layers: 3,
            heads: 1,
            max_positions: 77,
            projection_dim: Some(32),
        };
        Self {
            unet: UnetConfig {
                in_channels: 4,
                out_channels: 4,
                model_channels: 32,
                channel_mult: vec![1, 2, 4],
                num_res_blocks: 2,
                transformer_depth: vec![0, 1, 2],
                transformer_depth_middle: 2,
                head_dim: 64,
                context_dim: te1.hidden + te2.hidden,
                adm_in_channels: te2.projection_dim.unwrap_or(te2.hidden) + 6 * 256,
                norm_groups: 32,
            },
            te1,
            te2,
            vae: VaeConfig {
                base_channels: 32,
                channel_mult: vec![1, 1, 1, 1],
                num_res_blocks: 1,
                latent_channels: 4,
                scaling_factor: 0.13025,
            },
        }
    }
}

impl SdxlConfig {
    /// The toy-world base (`crates/lora-sdxl/assets/toy_world.safetensors`,
    /// built by `make toy-world`): [`SdxlConfig::tiny`]'s text encoders and
    /// VAE with one transformer per attention level (a smaller file), trained
    /// at 64 px on [`lora_data::toy_world`].
    pub fn toy_world() -> Self {
        let mut c = Self::tiny();
        c.unet.transformer_depth = vec![0, 1, 1];
        c.unet.transformer_depth_middle = 1;
        c
    }
}

/// How the weights are named in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipLayout {
    /// Hugging Face `CLIPTextModel` names (`text_model.…`).
    HuggingFace,
    /// OpenCLIP names (`transformer.resblocks.N.…`, fused `attn.in_proj_weight`).
    OpenClip,
}
