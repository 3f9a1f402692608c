//! The job file (`job.toml`): a strict TOML schema whose names follow AI
//! Toolkit so settings carry over. Unknown keys are errors that name the key
//! and the closest valid one; every value is validated before any heavy work.
//!
//! | concept | file |
//! |---|---|
//! | the sections and their defaults | this file; `[train]` in `train_section.rs` |
//! | reading a file: parsing, the `train.vram` preset, relative paths | `load.rs` |
//! | the memory presets | [`vram`] |
//! | every key's help text and allowed values | [`fields`] |
//! | unknown keys | `keys.rs` |
//! | value checks | `validate.rs` |
//! | the commented template of `lorakit init` | `template.rs` |

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
pub use train_section::TrainSection;

mod auto;
pub mod fields;
mod keys;
mod load;
mod template;
mod train_section;
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
