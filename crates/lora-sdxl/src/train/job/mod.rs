//! The job file (`job.toml`): a strict TOML schema whose names follow AI
//! Toolkit so settings carry over. Unknown keys are errors that name the key
//! and the closest valid one; every value is validated before any heavy work.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A validation or parse problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {message}")]
pub struct JobError {
    /// The job file.
    pub file: PathBuf,
    /// `section.key` (or `datasets[i].key`).
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

/// `[job]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSection {
    /// Run name: files are `<output_dir>/<name>/<name>_<step>.safetensors`.
    pub name: String,
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
    /// Rescale the schedule to zero terminal SNR.
    pub zero_terminal_snr: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            arch: "sdxl".into(),
            name_or_path: PathBuf::new(),
            prediction: None,
            zero_terminal_snr: false,
        }
    }
}

/// `[network]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
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
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            linear: 16,
            linear_alpha: 16.0,
            conv: 8,
            conv_alpha: 8.0,
            dropout: 0.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
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
    /// `adamw` or `adamw8bit`.
    pub optimizer: String,
    /// `constant`, `constant_with_warmup`, `cosine`, `linear`, `cosine_with_restarts`.
    pub lr_scheduler: String,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient clipping (0 = off).
    pub max_grad_norm: f64,
    /// Noise offset.
    pub noise_offset: f64,
    /// Min-SNR-γ weighting.
    pub min_snr_gamma: Option<f64>,
    /// `l2` or `huber`.
    pub loss: String,
    /// Lowest timestep drawn.
    pub min_timestep: u32,
    /// Highest timestep drawn (exclusive).
    pub max_timestep: u32,
    /// Train the UNet LoRA.
    pub train_unet: bool,
    /// Train text-encoder LoRAs.
    pub train_text_encoder: bool,
    /// Dtype of the frozen base: `bf16`, `fp16`, `fp32`.
    pub dtype: String,
    /// Recompute the UNet blocks' (and, when trained, the text encoders'
    /// layers') activations in backward instead of keeping them (default on,
    /// as in AI Toolkit): much less memory, more compute.
    pub gradient_checkpointing: bool,
    /// Encode images once and cache the latents.
    pub cache_latents: bool,
    /// Cache text-encoder outputs (needs static captions and frozen encoders).
    pub cache_text_embeddings: bool,
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
            lr_scheduler: "constant".into(),
            warmup_steps: 0,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            noise_offset: 0.0,
            min_snr_gamma: None,
            loss: "l2".into(),
            min_timestep: 0,
            max_timestep: 1000,
            train_unet: true,
            train_text_encoder: false,
            dtype: "bf16".into(),
            gradient_checkpointing: true,
            cache_latents: true,
            cache_text_embeddings: false,
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
    /// Generation parameters for one prompt (`[trigger]` becomes the trigger word).
    pub fn generate_params(
        &self,
        prompt: &str,
        trigger: Option<&str>,
    ) -> crate::pipeline::GenerateParams {
        let fill = |p: &str| match trigger {
            Some(t) => p.replace("[trigger]", t),
            None => p.to_string(),
        };
        crate::pipeline::GenerateParams {
            prompt: fill(prompt),
            negative: fill(&self.negative_prompt),
            steps: self.sample_steps as usize,
            cfg: self.guidance_scale,
            sampler: self.sampler.parse().unwrap_or_default(),
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

/// Valid keys per table (for unknown-key errors with a suggestion).
const SCHEMA: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "job",
            "model",
            "network",
            "save",
            "train",
            "datasets",
            "sample",
            "validation",
        ],
    ),
    (
        "job",
        &["name", "trigger_word", "output_dir", "device", "seed"],
    ),
    (
        "model",
        &["arch", "name_or_path", "prediction", "zero_terminal_snr"],
    ),
    (
        "network",
        &[
            "linear",
            "linear_alpha",
            "conv",
            "conv_alpha",
            "dropout",
            "rank_dropout",
            "module_dropout",
        ],
    ),
    ("save", &["save_every", "max_step_saves_to_keep", "dtype"]),
    (
        "train",
        &[
            "batch_size",
            "gradient_accumulation",
            "steps",
            "lr",
            "text_encoder_lr",
            "optimizer",
            "lr_scheduler",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "noise_offset",
            "min_snr_gamma",
            "loss",
            "min_timestep",
            "max_timestep",
            "train_unet",
            "train_text_encoder",
            "dtype",
            "gradient_checkpointing",
            "cache_latents",
            "cache_text_embeddings",
        ],
    ),
    (
        "datasets",
        &[
            "folder_path",
            "caption_ext",
            "resolution",
            "num_repeats",
            "caption_dropout_rate",
            "shuffle_tokens",
            "keep_tokens",
            "tag_dropout_rate",
            "flip_x",
            "random_crop",
        ],
    ),
    (
        "sample",
        &[
            "disable",
            "sample_every",
            "prompts",
            "negative_prompt",
            "seed",
            "guidance_scale",
            "sample_steps",
            "sampler",
            "width",
            "height",
            "strength",
        ],
    ),
    ("validation", &["every", "images", "seed"]),
];

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The valid key closest to `key` (by edit distance), if reasonably close.
pub fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (edit_distance(key, v), *v))
        .min()
        .filter(|(d, v)| *d <= (v.len().max(key.len()) / 2).max(2))
        .map(|(_, v)| v)
}

fn check_keys(file: &Path, value: &toml::Value) -> Result<(), JobError> {
    let table = value.as_table().expect("a TOML document is a table");
    let valid_of = |t: &str| {
        SCHEMA
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(_, k)| *k)
            .unwrap_or(&[])
    };
    let unknown = |field: String, key: &str, valid: &[&str]| JobError {
        file: file.to_path_buf(),
        field,
        message: match closest(key, valid) {
            Some(c) => format!("unknown key; did you mean `{c}`?"),
            None => format!("unknown key; valid keys here: {}", valid.join(", ")),
        },
    };
    for (k, v) in table {
        if !valid_of("").contains(&k.as_str()) {
            return Err(unknown(k.clone(), k, valid_of("")));
        }
        let tables: Vec<(String, &toml::value::Table)> = match v {
            toml::Value::Table(t) => vec![(k.clone(), t)],
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.as_table().map(|t| (format!("{k}[{i}]"), t)))
                .collect(),
            _ => continue,
        };
        for (name, t) in tables {
            for key in t.keys() {
                if !valid_of(k).contains(&key.as_str()) {
                    return Err(unknown(format!("{name}.{key}"), key, valid_of(k)));
                }
            }
        }
    }
    Ok(())
}

impl JobConfig {
    /// Parses a job file's text (`file` names it in errors): unknown keys and
    /// wrong types are errors naming the field. Values are not validated.
    pub fn parse(file: &Path, text: &str) -> Result<Self, JobError> {
        let err = |field: &str, message: String| JobError {
            file: file.to_path_buf(),
            field: field.into(),
            message,
        };
        let value: toml::Value = toml::from_str(text)
            .map_err(|e| err("syntax", e.to_string().trim().replace('\n', " ")))?;
        check_keys(file, &value)?;
        value
            .try_into()
            .map_err(|e: toml::de::Error| err("value", e.to_string().trim().replace('\n', " ")))
    }

    /// Reads and parses a job file; relative paths in it are resolved against its folder.
    pub fn load(file: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(file).map_err(|e| JobError {
            file: file.to_path_buf(),
            field: "file".into(),
            message: format!("cannot read the job file: {e}"),
        })?;
        let mut cfg = Self::parse(file, &text)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.model.name_or_path);
        fix(&mut cfg.job.output_dir);
        for d in &mut cfg.datasets {
            fix(&mut d.folder_path);
        }
        Ok(cfg)
    }

    /// Checks every value (ranges, choices, files). Does not open the model
    /// or scan the datasets (see the trainer for those checks).
    pub fn validate(&self, file: &Path) -> Result<(), JobError> {
        let err = |field: &str, message: String| {
            Err(JobError {
                file: file.to_path_buf(),
                field: field.into(),
                message,
            })
        };
        let one_of = |field: &str, v: &str, allowed: &[&str]| {
            if allowed.contains(&v) {
                Ok(())
            } else {
                err(
                    field,
                    format!("`{v}` is not one of: {}", allowed.join(", ")),
                )
            }
        };
        let rate = |field: &str, p: f64| {
            if (0.0..1.0).contains(&p) {
                Ok(())
            } else {
                err(field, format!("{p} must be in [0, 1)"))
            }
        };
        let j = &self.job;
        if j.name.trim().is_empty() || j.name.contains(['/', '\\']) {
            return err(
                "job.name",
                "must be a non-empty file name (no slashes)".into(),
            );
        }
        if let Some(d) = &j.device {
            let ok = d == "cpu"
                || d == "cuda"
                || d.strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<usize>().is_ok());
            if !ok {
                return err(
                    "job.device",
                    format!("`{d}` is not `cuda`, `cuda:N` or `cpu`"),
                );
            }
        }
        one_of("model.arch", &self.model.arch, &["sdxl"])?;
        if self.model.name_or_path.as_os_str().is_empty() {
            return err(
                "model.name_or_path",
                "set it to your SDXL checkpoint (.safetensors) or diffusers folder".into(),
            );
        }
        if !self.model.name_or_path.exists() {
            return err(
                "model.name_or_path",
                format!("{} does not exist", self.model.name_or_path.display()),
            );
        }
        if let Some(p) = &self.model.prediction {
            one_of("model.prediction", p, &["epsilon", "v_prediction"])?;
        }
        let n = &self.network;
        if n.linear < 1 || n.linear > 1024 {
            return err(
                "network.linear",
                format!("rank {} must be in 1..=1024", n.linear),
            );
        }
        if n.conv < 0 || n.conv > 1024 {
            return err(
                "network.conv",
                format!("rank {} must be in 0..=1024 (0 = no conv LoRA)", n.conv),
            );
        }
        for (f, a) in [
            ("network.linear_alpha", n.linear_alpha),
            ("network.conv_alpha", n.conv_alpha),
        ] {
            if !(a > 0.0 && a.is_finite()) {
                return err(f, format!("{a} must be positive"));
            }
        }
        rate("network.dropout", n.dropout)?;
        rate("network.rank_dropout", n.rank_dropout)?;
        rate("network.module_dropout", n.module_dropout)?;
        if self.save.save_every == 0 {
            return err("save.save_every", "must be at least 1".into());
        }
        if self.save.max_step_saves_to_keep == 0 {
            return err("save.max_step_saves_to_keep", "must be at least 1".into());
        }
        one_of("save.dtype", &self.save.dtype, &["fp16", "bf16", "fp32"])?;
        let t = &self.train;
        if t.batch_size == 0 || t.batch_size > 256 {
            return err(
                "train.batch_size",
                format!("{} must be in 1..=256", t.batch_size),
            );
        }
        if t.gradient_accumulation == 0 {
            return err("train.gradient_accumulation", "must be at least 1".into());
        }
        if t.steps == 0 {
            return err("train.steps", "must be at least 1".into());
        }
        for (f, lr) in [
            ("train.lr", Some(t.lr)),
            ("train.text_encoder_lr", t.text_encoder_lr),
        ] {
            if let Some(lr) = lr {
                if !(lr > 0.0 && lr < 1.0) {
                    return err(
                        f,
                        format!("{lr} must be in (0, 1); typical LoRA rates are 1e-5 to 1e-3"),
                    );
                }
            }
        }
        one_of("train.optimizer", &t.optimizer, &["adamw", "adamw8bit"])?;
        one_of(
            "train.lr_scheduler",
            &t.lr_scheduler,
            &[
                "constant",
                "constant_with_warmup",
                "cosine",
                "linear",
                "cosine_with_restarts",
            ],
        )?;
        if t.warmup_steps > t.steps {
            return err(
                "train.warmup_steps",
                format!("{} is more than train.steps ({})", t.warmup_steps, t.steps),
            );
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay < 1.0) {
            return err(
                "train.weight_decay",
                format!("{} must be in [0, 1)", t.weight_decay),
            );
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return err(
                "train.max_grad_norm",
                "must be ≥ 0 (0 turns clipping off)".into(),
            );
        }
        if !(0.0..=1.0).contains(&t.noise_offset) {
            return err(
                "train.noise_offset",
                format!(
                    "{} must be in [0, 1] (0.0357 is a common value)",
                    t.noise_offset
                ),
            );
        }
        if let Some(g) = t.min_snr_gamma {
            if !(g > 0.0 && g.is_finite()) {
                return err(
                    "train.min_snr_gamma",
                    format!("{g} must be positive (5 is the usual value)"),
                );
            }
        }
        one_of("train.loss", &t.loss, &["l2", "huber"])?;
        if t.max_timestep > 1000 || t.min_timestep >= t.max_timestep {
            return err(
                "train.min_timestep",
                format!(
                    "need 0 ≤ min_timestep < max_timestep ≤ 1000, got {}..{}",
                    t.min_timestep, t.max_timestep
                ),
            );
        }
        if !t.train_unet && !t.train_text_encoder {
            return err(
                "train.train_unet",
                "nothing to train: enable train_unet and/or train_text_encoder".into(),
            );
        }
        one_of("train.dtype", &t.dtype, &["bf16", "fp16", "fp32"])?;
        if t.cache_text_embeddings && t.train_text_encoder {
            return err(
                "train.cache_text_embeddings",
                "cannot cache text embeddings while training the text encoders".into(),
            );
        }
        if self.datasets.is_empty() {
            return err(
                "datasets",
                "add at least one [[datasets]] table with folder_path".into(),
            );
        }
        for (i, d) in self.datasets.iter().enumerate() {
            let f = |k: &str| format!("datasets[{i}].{k}");
            if d.folder_path.as_os_str().is_empty() || !d.folder_path.is_dir() {
                return err(
                    &f("folder_path"),
                    format!("`{}` is not a folder", d.folder_path.display()),
                );
            }
            if d.resolution.is_empty() {
                return err(
                    &f("resolution"),
                    "give at least one resolution, e.g. [512, 768]".into(),
                );
            }
            if let Some(r) = d
                .resolution
                .iter()
                .find(|r| **r < 256 || **r > 2048 || **r % 64 != 0)
            {
                return err(
                    &f("resolution"),
                    format!("{r} must be a multiple of 64 between 256 and 2048"),
                );
            }
            if d.num_repeats == 0 {
                return err(&f("num_repeats"), "must be at least 1".into());
            }
            rate(&f("caption_dropout_rate"), d.caption_dropout_rate)?;
            rate(&f("tag_dropout_rate"), d.tag_dropout_rate)?;
            if t.cache_text_embeddings {
                let dynamic = [
                    ("caption_dropout_rate", d.caption_dropout_rate > 0.0),
                    ("tag_dropout_rate", d.tag_dropout_rate > 0.0),
                    ("shuffle_tokens", d.shuffle_tokens),
                ];
                if let Some((field, _)) = dynamic.iter().find(|(_, on)| *on) {
                    return err(&f(field), "train.cache_text_embeddings needs static captions: set caption_dropout_rate and tag_dropout_rate to 0 and shuffle_tokens to false, or turn the cache off".into());
                }
            }
        }
        let s = &self.sample;
        if let Err(e) = s.sampler.parse::<crate::sampling::SamplerSpec>() {
            return err("sample.sampler", e);
        }
        if let Err(crate::SdxlError::Param { name, reason }) =
            s.generate_params("", None).validate()
        {
            let field = match name {
                "steps" => "sample_steps",
                "cfg" => "guidance_scale",
                other => other,
            };
            return err(&format!("sample.{field}"), reason);
        }
        if !(s.strength.is_finite() && (-4.0..=4.0).contains(&s.strength)) {
            return err(
                "sample.strength",
                format!(
                    "{} must be between -4 and 4 (usually 0.6 to 1.0)",
                    s.strength
                ),
            );
        }
        if !s.disable && s.prompts.is_empty() {
            return err(
                "sample.prompts",
                "sampling is enabled but there are no prompts".into(),
            );
        }
        if s.sample_every == 0 || s.sample_steps == 0 {
            return err(
                "sample.sample_every",
                "sample_every and sample_steps must be at least 1".into(),
            );
        }
        if self.validation.every == Some(0) {
            return err("validation.every", "must be at least 1".into());
        }
        Ok(())
    }

    /// A commented job file with the defaults of a first character LoRA.
    pub fn template(model: Option<&str>, dataset: Option<&str>, trigger: Option<&str>) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let model = model
            .map(q)
            .unwrap_or_else(|| q("path/to/sdxl_checkpoint.safetensors"));
        let dataset = dataset.map(q).unwrap_or_else(|| q("path/to/dataset"));
        let trigger_line = match trigger {
            Some(t) => format!("trigger_word = {}", q(t)),
            None => "# trigger_word = \"myakumyaku-san\"   # inserted first in every caption; replaces [trigger]".into(),
        };
        let name = trigger
            .map(|t| {
                t.replace(
                    |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
                    "_",
                )
            })
            .unwrap_or_else(|| "my_lora".into());
        format!(
            r#"# lorakit job file. Run with: lorakit train job.toml
# Names follow AI Toolkit, so settings carry over. Unknown keys are errors.

[job]
name = {name}                 # files: <output_dir>/<name>/<name>_<step>.safetensors
{trigger_line}
output_dir = "output"
# device = "cuda"              # "cuda", "cuda:N" or "cpu"; default: CUDA when available
seed = 42

[model]
arch = "sdxl"                  # SDXL 1.0 and fine-tunes (Illustrious, Pony, NoobAI…)
name_or_path = {model}
# prediction = "v_prediction"  # default: read from the checkpoint (v_pred key)
zero_terminal_snr = false

[network]                      # kohya LoRA / LoCon
linear = 16                    # rank of Linear and 1x1 conv modules
linear_alpha = 16
conv = 8                       # rank of 3x3 convs (LoCon); 0 = plain LoRA
conv_alpha = 8
dropout = 0.0
rank_dropout = 0.0
module_dropout = 0.0

[save]
save_every = 100               # a checkpoint every 100 steps
max_step_saves_to_keep = 30    # keep the newest 30
dtype = "fp16"                 # fp16 | bf16 | fp32

[train]
batch_size = 2
gradient_accumulation = 2      # effective batch 4
steps = 3000
lr = 7e-5
# text_encoder_lr = 7e-5
optimizer = "adamw"            # adamw | adamw8bit (bitsandbytes-style 8-bit moments: ¼ of the optimizer memory)
lr_scheduler = "constant"      # constant | constant_with_warmup | cosine | linear | cosine_with_restarts
warmup_steps = 0
weight_decay = 0.01
max_grad_norm = 1.0
noise_offset = 0.0
# min_snr_gamma = 5.0
loss = "l2"                    # l2 | huber
min_timestep = 0
max_timestep = 1000
train_unet = true
train_text_encoder = false
dtype = "bf16"                 # dtype of the frozen base model
gradient_checkpointing = true   # recompute activations in backward: far less VRAM, ~30% slower
cache_latents = true
cache_text_embeddings = false

[[datasets]]
folder_path = {dataset}        # images with same-name .txt captions
caption_ext = "txt"
resolution = [512, 768]
num_repeats = 1
caption_dropout_rate = 0.05
shuffle_tokens = false
keep_tokens = 1                # the trigger word stays first
tag_dropout_rate = 0.0
flip_x = false
random_crop = false

[sample]
disable = true                 # in-training samples (prompts x steps grid)
sample_every = 250
prompts = ["[trigger], 1girl, standing, outdoors"]
negative_prompt = ""
seed = 42
guidance_scale = 7.0
sample_steps = 25
sampler = "euler"
width = 1024
height = 1024
strength = 1.0

[validation]                   # fixed-seed validation loss at every save
# every = 100
# images = 4
"#,
            name = q(&name)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_to_the_documented_defaults() {
        let t = JobConfig::template(Some("m.safetensors"), Some("data"), Some("myakumyaku-san"));
        let c = JobConfig::parse(Path::new("job.toml"), &t).unwrap();
        assert_eq!(c.job.name, "myakumyaku-san");
        assert_eq!(c.job.trigger_word.as_deref(), Some("myakumyaku-san"));
        assert_eq!(
            (
                c.network.linear,
                c.network.linear_alpha,
                c.network.conv,
                c.network.conv_alpha
            ),
            (16, 16.0, 8, 8.0)
        );
        assert_eq!(
            (c.save.save_every, c.save.max_step_saves_to_keep),
            (100, 30)
        );
        assert_eq!(
            (
                c.train.batch_size,
                c.train.gradient_accumulation,
                c.train.steps
            ),
            (2, 2, 3000)
        );
        assert_eq!(c.train.lr, 7e-5);
        assert_eq!(c.datasets[0].resolution, vec![512, 768]);
        assert!(c.sample.disable);
        // the template's values equal the serde defaults
        assert_eq!(c.network, NetworkSection::default());
        assert_eq!(c.save, SaveSection::default());
        assert_eq!(c.train, TrainSection::default());
    }

    #[test]
    fn unknown_keys_name_the_closest_valid_one() {
        let e = JobConfig::parse(Path::new("job.toml"), "[train]\nlearning_rate = 1e-4\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job.toml")
                && e.contains("train.learning_rate")
                && e.contains("unknown key"),
            "{e}"
        );
        let e = JobConfig::parse(Path::new("job.toml"), "[train]\nstpes = 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `steps`"), "{e}");
        let e = JobConfig::parse(Path::new("job.toml"), "[[datasets]]\nfolder = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("datasets[0].folder") && e.contains("folder_path"),
            "{e}"
        );
        let e = JobConfig::parse(Path::new("job.toml"), "[netwrok]\nlinear = 4\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `network`"), "{e}");
        let e = JobConfig::parse(Path::new("job.toml"), "[train]\nsteps = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("job.toml") && e.contains("steps"), "{e}");
        let e = JobConfig::parse(Path::new("job.toml"), "[train\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("syntax"), "{e}");
    }

    #[test]
    fn values_are_validated_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        std::fs::write(&model, b"x").unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let base = JobConfig::template(model.to_str(), data.to_str(), Some("trig"));
        let job = dir.path().join("job.toml");
        let check = |edit: &dyn Fn(&mut JobConfig)| {
            let mut c = JobConfig::parse(&job, &base).unwrap();
            edit(&mut c);
            c.validate(&job).err().map(|e| e.to_string())
        };
        assert_eq!(check(&|_| {}), None);
        type Edit = Box<dyn Fn(&mut JobConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.train.lr = -1e-4), "train.lr"),
            (
                Box::new(|c| c.model.name_or_path = "/nope.safetensors".into()),
                "model.name_or_path",
            ),
            (
                Box::new(|c| c.datasets[0].resolution = vec![500]),
                "datasets[0].resolution",
            ),
            (Box::new(|c| c.datasets.clear()), "datasets"),
            (
                Box::new(|c| c.datasets[0].folder_path = "/no/such/dir".into()),
                "datasets[0].folder_path",
            ),
            (Box::new(|c| c.network.linear = 0), "network.linear"),
            (
                Box::new(|c| c.train.optimizer = "sgd".into()),
                "train.optimizer",
            ),
            (
                Box::new(|c| c.train.min_timestep = 1000),
                "train.min_timestep",
            ),
            (
                Box::new(|c| c.job.device = Some("gpu".into())),
                "job.device",
            ),
            (
                Box::new(|c| {
                    c.sample.disable = false;
                    c.sample.prompts.clear();
                }),
                "sample.prompts",
            ),
            (Box::new(|c| c.save.dtype = "int8".into()), "save.dtype"),
            (
                Box::new(|c| {
                    c.train.cache_text_embeddings = true;
                    c.train.train_text_encoder = true;
                }),
                "train.cache_text_embeddings",
            ),
            (
                Box::new(|c| {
                    c.train.cache_text_embeddings = true;
                    c.datasets[0].caption_dropout_rate = 0.1;
                }),
                "datasets[0].caption_dropout_rate",
            ),
        ];
        for (edit, field) in cases {
            let e = check(&*edit).unwrap_or_else(|| panic!("{field}: expected an error"));
            assert!(e.contains(field) && e.contains("job.toml"), "{field}: {e}");
        }
    }
}
