//! The job file (`job.toml`): a strict TOML schema whose names follow AI
//! Toolkit so settings carry over. Unknown keys are errors that name the key
//! and the closest valid one; every value is validated before any heavy work.
//!
//! | concept | file |
//! |---|---|
//! | the sections and their defaults | this file |
//! | reading a file: parsing, the `train.vram` preset, relative paths | `load.rs` |
//! | the memory presets | [`vram`] |
//! | every key's help text and allowed values | [`fields`] |
//! | unknown keys | `keys.rs` |
//! | value checks | `validate.rs` |
//! | the commented template of `lorakit init` | `template.rs` |

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

mod auto;
pub mod fields;
mod keys;
mod load;
mod template;
pub use template::JobDefaults;
#[cfg(test)]
mod tests;
mod validate;
pub mod vram;

pub use auto::AutoBool;
pub use keys::closest;

/// A validation or parse problem, naming the file and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct JobError {
    /// The job file.
    pub file: PathBuf,
    /// `section.key` (or `datasets[i].key`).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// `down_lr_weight` / `up_lr_weight`: values or a preset name (resolved to
/// the 9 weights by `train::blocks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockWeights {
    /// One weight per block (shallow to deep for `down`, deep to shallow
    /// for `up`).
    List(Vec<f64>),
    /// `cosine`, `sine`, `linear`, `reverse_linear` or `zeros`, with an
    /// optional `+base` added to every weight (`sine+0.25`).
    Preset(String),
}

/// `[job]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSection {
    /// Run name: files are `<output_dir>/<name>/<name>_<step>.safetensors`.
    pub name: String,
    /// This job's identity, recorded in its saved state: `--resume`
    /// refuses a state written under another id (or none).
    pub id: Option<String>,
    /// Trigger word (inserted first in captions; replaces `[trigger]`).
    pub trigger_word: Option<String>,
    /// Output folder.
    pub output_dir: PathBuf,
    /// `cuda`, `cuda:N` or `cpu`; default: CUDA when available.
    pub device: Option<String>,
    /// Seed of everything random.
    pub seed: u64,
}

impl Default for JobSection {
    fn default() -> Self {
        Self {
            name: "my_lora".into(),
            id: None,
            trigger_word: None,
            output_dir: "output".into(),
            device: None,
            seed: 42,
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Architecture (only `sdxl`).
    pub arch: String,
    /// Single-file checkpoint or diffusers folder.
    pub name_or_path: PathBuf,
    /// `epsilon` or `v_prediction`; default from the checkpoint.
    pub prediction: Option<String>,
    /// Rescale the schedule to zero terminal SNR; default: what the
    /// checkpoint declares (`ztsnr` key or the folder's scheduler config).
    pub zero_terminal_snr: Option<bool>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            arch: "sdxl".into(),
            name_or_path: PathBuf::new(),
            prediction: None,
            zero_terminal_snr: None,
        }
    }
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    /// `lora` / `locon` (kohya), `loha` or `lokr` (LyCORIS).
    pub r#type: String,
    /// LoKr: LyCORIS' `factor` (-1: the most balanced split).
    pub factor: i64,
    /// LoKr: the small factor low-rank too (LyCORIS' `decompose_both`).
    pub decompose_both: bool,
    /// DoRA: a learned magnitude per input channel (LyCORIS' `dora_wd`).
    pub dora: bool,
    /// Rank of Linear and 1x1 conv modules.
    pub linear: i64,
    /// Alpha of Linear and 1x1 conv modules.
    pub linear_alpha: f64,
    /// Rank of 3x3 convs (0 = no LoCon).
    pub conv: i64,
    /// Alpha of 3x3 convs.
    pub conv_alpha: f64,
    /// Neuron dropout.
    pub dropout: f64,
    /// Rank dropout.
    pub rank_dropout: f64,
    /// Module dropout.
    pub module_dropout: f64,
    /// Per-block ranks of Linear / 1x1 modules (23 values, kohya's
    /// `block_dims`; see [`crate::train::blocks`]).
    pub block_dims: Option<Vec<i64>>,
    /// Per-block alphas of those.
    pub block_alphas: Option<Vec<f64>>,
    /// Per-block ranks of 3x3 convs.
    pub conv_block_dims: Option<Vec<i64>>,
    /// Per-block alphas of those.
    pub conv_block_alphas: Option<Vec<f64>>,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            r#type: "lora".into(),
            factor: -1,
            decompose_both: false,
            dora: false,
            linear: 16,
            linear_alpha: 16.0,
            conv: 8,
            conv_alpha: 8.0,
            dropout: 0.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            block_dims: None,
            block_alphas: None,
            conv_block_dims: None,
            conv_block_alphas: None,
        }
    }
}

/// `[save]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaveSection {
    /// Steps between checkpoints.
    pub save_every: u64,
    /// Newest step files kept.
    pub max_step_saves_to_keep: u64,
    /// `fp16`, `bf16` or `fp32`.
    pub dtype: String,
}

impl Default for SaveSection {
    fn default() -> Self {
        Self {
            save_every: 100,
            max_step_saves_to_keep: 30,
            dtype: "fp16".into(),
        }
    }
}

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

/// One `[[datasets]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetSection {
    /// Folder of images with same-name captions.
    pub folder_path: PathBuf,
    /// Caption extension.
    pub caption_ext: String,
    /// Training resolutions.
    pub resolution: Vec<u32>,
    /// Repeats per image.
    pub num_repeats: u32,
    /// Probability of an empty caption.
    pub caption_dropout_rate: f64,
    /// Shuffle tags after `keep_tokens`.
    pub shuffle_tokens: bool,
    /// Leading tags that never move.
    pub keep_tokens: usize,
    /// Probability of dropping each free tag.
    pub tag_dropout_rate: f64,
    /// Random horizontal flips.
    pub flip_x: bool,
    /// Random instead of centre crops.
    pub random_crop: bool,
    /// Folder of loss masks with the images' names (kohya's masked loss:
    /// white = learned, black = ignored).
    pub mask_path: Option<PathBuf>,
    /// The images' alpha channels are their loss masks.
    pub alpha_mask: bool,
    /// Regularisation images (kohya's `is_reg`): the class without the
    /// character, mixed into the batches with weight `train.prior_loss_weight`.
    pub is_reg: bool,
}

impl Default for DatasetSection {
    fn default() -> Self {
        Self {
            folder_path: PathBuf::new(),
            caption_ext: "txt".into(),
            resolution: vec![512, 768],
            num_repeats: 1,
            caption_dropout_rate: 0.05,
            shuffle_tokens: false,
            keep_tokens: 1,
            tag_dropout_rate: 0.0,
            flip_x: false,
            random_crop: false,
            mask_path: None,
            alpha_mask: false,
            is_reg: false,
        }
    }
}

/// `[sample]` (used by in-training sampling; validated now).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleSection {
    /// No samples.
    pub disable: bool,
    /// Steps between sample rounds.
    pub sample_every: u64,
    /// Prompts (`[trigger]` becomes the trigger word).
    pub prompts: Vec<String>,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Seed.
    pub seed: u64,
    /// CFG scale.
    pub guidance_scale: f64,
    /// Sampler steps.
    pub sample_steps: u32,
    /// `euler`, `euler_ancestral`, `dpmpp_2m`, `dpmpp_2m_karras`, `ddim`.
    pub sampler: String,
    /// Width (multiple of 8).
    pub width: u32,
    /// Height (multiple of 8).
    pub height: u32,
    /// LoRA strength for samples.
    pub strength: f64,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            disable: true,
            sample_every: 250,
            prompts: Vec::new(),
            negative_prompt: String::new(),
            seed: 42,
            guidance_scale: 7.0,
            sample_steps: 25,
            sampler: "euler".into(),
            width: 1024,
            height: 1024,
            strength: 1.0,
        }
    }
}

impl SampleSection {
    /// Generation parameters for one prompt (`[trigger]` becomes the
    /// trigger word) drawn with `sampler` (the plan's `sample.sampler`).
    pub fn generate_params(
        &self,
        sampler: crate::sample::SamplerSpec,
        prompt: &str,
        trigger: Option<&str>,
    ) -> crate::sample::txt2img::GenerateParams {
        let fill = |p: &str| match trigger {
            Some(t) => p.replace("[trigger]", t),
            None => p.to_string(),
        };
        crate::sample::txt2img::GenerateParams {
            prompt: fill(prompt),
            negative: fill(&self.negative_prompt),
            steps: self.sample_steps as usize,
            cfg: self.guidance_scale,
            sampler,
            seed: self.seed,
            width: self.width,
            height: self.height,
            batch_size: 1,
        }
    }
}

/// `[validation]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationSection {
    /// Steps between validation losses (default: `save.save_every`).
    pub every: Option<u64>,
    /// Images in the fixed validation set.
    pub images: Option<usize>,
    /// Seed of the validation noise and timesteps.
    pub seed: Option<u64>,
}

/// A whole job file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// `[job]`.
    pub job: JobSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[network]`.
    pub network: NetworkSection,
    /// `[save]`.
    pub save: SaveSection,
    /// `[train]`.
    pub train: TrainSection,
    /// `[[datasets]]`.
    pub datasets: Vec<DatasetSection>,
    /// `[sample]`.
    pub sample: SampleSection,
    /// `[validation]`.
    pub validation: ValidationSection,
}
