//! `[train]` of the job file: the optimizer, schedule, loss and trainer
//! settings, and their defaults (the other sections are in `mod.rs`).

use super::{AutoBool, BlockWeights};
use serde::{Deserialize, Serialize};

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Images per step.
    pub batch_size: usize,
    /// Steps accumulated per optimizer update.
    pub gradient_accumulation: usize,
    /// Optimizer updates.
    pub steps: u64,
    /// UNet learning rate.
    pub lr: f64,
    /// Text-encoder learning rate (default: `lr`).
    pub text_encoder_lr: Option<f64>,
    /// `adamw`, `adamw8bit`, `lion`, `lion8bit`, `prodigy` or `adafactor`.
    pub optimizer: String,
    /// The optimizer's own settings (`[train.optimizer_args]`), named as
    /// its reference package names them (see [`crate::train::optim`]).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub optimizer_args: std::collections::BTreeMap<String, toml::Value>,
    /// `constant`, `constant_with_warmup`, `cosine`, `linear`, `cosine_with_restarts`.
    pub lr_scheduler: String,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Cosines of `cosine_with_restarts` (kohya's `lr_scheduler_num_cycles`).
    pub lr_scheduler_num_cycles: u32,
    /// Weight decay (`None`: the optimizer's own default, see
    /// [`crate::train::optim::default_weight_decay`]).
    pub weight_decay: Option<f64>,
    /// Gradient clipping (0 = off).
    pub max_grad_norm: f64,
    /// Noise offset.
    pub noise_offset: f64,
    /// kohya's multi-resolution (pyramid) noise: levels (0 = off).
    pub multires_noise_iterations: u32,
    /// Weight of each coarser pyramid level (kohya's default 0.3).
    pub multires_noise_discount: f64,
    /// Input perturbation noise γ (kohya's `ip_noise_gamma`; 0 = off).
    pub ip_noise_gamma: f64,
    /// Draw the perturbation's strength from [0, γ) each step.
    pub ip_noise_gamma_random_strength: bool,
    /// kohya's debiased-estimation loss weighting.
    pub debiased_estimation_loss: bool,
    /// LoRA+ (kohya's `loraplus_lr_ratio`): the up matrices learn this many
    /// times faster than the down matrices.
    pub loraplus_lr_ratio: Option<f64>,
    /// EMA of the LoRA weights (diffusers' `EMAModel` decay); the saved
    /// files hold the average. Off when unset.
    pub ema_decay: Option<f64>,
    /// EMA power warm-up (diffusers' `use_ema_warmup`, `power`; 2/3 is
    /// its default); without it the decay ramps as (1 + k)/(10 + k).
    pub ema_power: Option<f64>,
    /// Learning-rate weights of `input_blocks.0–8` (kohya's `down_lr_weight`).
    pub down_lr_weight: Option<BlockWeights>,
    /// Learning-rate weights of `middle_block.0–2`.
    pub mid_lr_weight: Option<Vec<f64>>,
    /// Learning-rate weights of `output_blocks.0–8`.
    pub up_lr_weight: Option<BlockWeights>,
    /// Block weights at or below this are 0 (no LoRA in that block).
    pub block_lr_zero_threshold: f64,
    /// Loss weight of regularisation samples (kohya's `prior_loss_weight`).
    pub prior_loss_weight: f64,
    /// Min-SNR-γ weighting.
    pub min_snr_gamma: Option<f64>,
    /// `l2` or `huber`.
    pub loss: String,
    /// Lowest timestep drawn.
    pub min_timestep: u32,
    /// Highest timestep drawn (exclusive).
    pub max_timestep: u32,
    /// `uniform`, `sigmoid` or `logit_normal` (see [`crate::train::timesteps`]).
    pub timestep_sampling: String,
    /// OneTrainer's `noising_weight`: the sigmoid's steepness, or the
    /// logit-normal's standard deviation minus 1.
    pub sigmoid_scale: Option<f64>,
    /// OneTrainer's `noising_bias`: moves the sigmoid's centre, or the
    /// logit-normal's mean.
    pub sigmoid_bias: f64,
    /// OneTrainer's `timestep_shift` (1 = none; > 1 draws noisier steps).
    pub timestep_shift: f64,
    /// Train the UNet LoRA.
    pub train_unet: bool,
    /// Train text-encoder LoRAs.
    pub train_text_encoder: bool,
    /// Dtype of the frozen base: `bf16`, `fp16`, `fp32`.
    pub dtype: String,
    /// Recompute the UNet blocks' (and, when trained, the text encoders'
    /// layers') activations in backward instead of keeping them: much less
    /// memory, more compute. `"auto"` (default): on for CUDA (as AI Toolkit
    /// does), off on CPU, where memory is not the limit.
    pub gradient_checkpointing: AutoBool,
    /// Encode images once and cache the latents.
    pub cache_latents: bool,
    /// Cache text-encoder outputs (needs static captions and frozen encoders).
    pub cache_text_embeddings: bool,
    /// A memory preset (`8gb`, `12gb`, `16gb`, `24gb`, `max`; see
    /// [`vram`]): fills the memory settings the job leaves unset and caps
    /// the pixels of a micro-batch.
    pub vram: Option<String>,
    /// Caption tokens seen (kohya's `max_token_length`): 75 truncates to one
    /// CLIP chunk; 150 or 225 use 2 or 3 chunks for every caption.
    pub max_token_length: usize,
    /// AI Toolkit's differential output preservation (see
    /// [`crate::train::preservation`]).
    pub diff_output_preservation: bool,
    /// The word the trigger becomes in its captions (needed with it).
    pub diff_output_preservation_class: Option<String>,
    /// Its loss weight.
    pub diff_output_preservation_multiplier: f64,
    /// AI Toolkit's blank prompt preservation: the same with `""`.
    pub blank_prompt_preservation: bool,
    /// Its loss weight.
    pub blank_prompt_preservation_multiplier: f64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            batch_size: 2,
            gradient_accumulation: 2,
            steps: 3000,
            lr: 7e-5,
            text_encoder_lr: None,
            optimizer: "adamw".into(),
            optimizer_args: Default::default(),
            lr_scheduler: "constant".into(),
            warmup_steps: 0,
            lr_scheduler_num_cycles: 1,
            weight_decay: None,
            max_grad_norm: 1.0,
            noise_offset: 0.0,
            multires_noise_iterations: 0,
            multires_noise_discount: 0.3,
            ip_noise_gamma: 0.0,
            ip_noise_gamma_random_strength: false,
            debiased_estimation_loss: false,
            loraplus_lr_ratio: None,
            ema_decay: None,
            ema_power: None,
            down_lr_weight: None,
            mid_lr_weight: None,
            up_lr_weight: None,
            block_lr_zero_threshold: 0.0,
            prior_loss_weight: 1.0,
            min_snr_gamma: None,
            loss: "l2".into(),
            min_timestep: 0,
            max_timestep: 1000,
            timestep_sampling: "uniform".into(),
            sigmoid_scale: None,
            sigmoid_bias: 0.0,
            timestep_shift: 1.0,
            train_unet: true,
            train_text_encoder: false,
            dtype: "bf16".into(),
            gradient_checkpointing: AutoBool::Auto,
            cache_latents: true,
            cache_text_embeddings: false,
            vram: None,
            max_token_length: 75,
            diff_output_preservation: false,
            diff_output_preservation_class: None,
            diff_output_preservation_multiplier: 1.0,
            blank_prompt_preservation: false,
            blank_prompt_preservation_multiplier: 1.0,
        }
    }
}
