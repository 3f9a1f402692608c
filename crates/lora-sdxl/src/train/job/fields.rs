//! Every key of the job file, once: its table, name, help text and the rule
//! its value must follow. The unknown-key check, the value checks and the
//! template (`lorakit init`) are all read from this table; defaults come from
//! the sections' `Default` impls.
//!
//! A named choice's list is its enum's `NAMES` (see `train::plan`), so the
//! names validated here are the names the plan parses.

use crate::train::optim::OptimizerArgs;
use crate::train::plan::{Loss, NetworkKind, SaveDtype, TrainDtype};
use crate::train::schedule::LrSchedule;
use crate::train::timesteps::TimestepSampling;

/// What a value must be (beyond its TOML type, which serde checks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// Anything of the right type.
    Free,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// One of these integers.
    OneOfInt(&'static [i64]),
    /// A number (or each number of an array) in a range; `open_*` excludes
    /// that end, an infinite end is unbounded.
    Range {
        /// Lower end.
        min: f64,
        /// Upper end.
        max: f64,
        /// `min` itself is not allowed.
        open_min: bool,
        /// `max` itself is not allowed.
        open_max: bool,
    },
}

const INF: f64 = f64::INFINITY;

const fn closed(min: f64, max: f64) -> Rule {
    Rule::Range {
        min,
        max,
        open_min: false,
        open_max: false,
    }
}

/// `[0, 1)`: a probability that is never certain.
const RATE: Rule = Rule::Range {
    min: 0.0,
    max: 1.0,
    open_min: false,
    open_max: true,
};

/// `(0, ∞)`.
const POSITIVE: Rule = Rule::Range {
    min: 0.0,
    max: INF,
    open_min: true,
    open_max: false,
};

/// `(0, 10]`: learning rates (Prodigy's is 1.0).
const LEARNING_RATE: Rule = Rule::Range {
    min: 0.0,
    max: 10.0,
    open_min: true,
    open_max: false,
};

/// At least 1.
const AT_LEAST_1: Rule = closed(1.0, INF);

impl Rule {
    /// The rule as a person reads it: `one of: a | b`, `1 to 1024`, `≥ 1`.
    pub fn describe(&self) -> Option<String> {
        match *self {
            Rule::Free => None,
            Rule::OneOf(v) => Some(v.join(" | ")),
            Rule::OneOfInt(v) => Some(
                v.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
            ),
            Rule::Range {
                min,
                max,
                open_min,
                open_max,
            } => Some(if max == INF {
                format!("{} {min}", if open_min { ">" } else { "≥" })
            } else {
                format!(
                    "{}{min}, {max}{}",
                    if open_min { "(" } else { "[" },
                    if open_max { ")" } else { "]" }
                )
            }),
        }
    }

    /// Whether number `v` follows a range rule (other rules: true).
    pub fn allows_number(&self, v: f64) -> bool {
        match *self {
            Rule::Range {
                min,
                max,
                open_min,
                open_max,
            } => {
                v.is_finite()
                    && (v > min || (!open_min && v == min))
                    && (v < max || (!open_max && v == max))
            }
            _ => true,
        }
    }
}

/// One key of the job file.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Its table (`datasets` for `[[datasets]]`).
    pub section: &'static str,
    /// The key.
    pub key: &'static str,
    /// What it does (template comment, and the start of error messages).
    pub help: &'static str,
    /// What its value must be.
    pub rule: Rule,
    /// Appended to a rule error: a typical value.
    pub hint: &'static str,
    /// For keys without a default (`Option`s): the value the template shows,
    /// commented out.
    pub example: Option<&'static str>,
}

const fn f(section: &'static str, key: &'static str, rule: Rule, help: &'static str) -> Field {
    Field {
        section,
        key,
        help,
        rule,
        hint: "",
        example: None,
    }
}

impl Field {
    const fn hint(mut self, hint: &'static str) -> Self {
        self.hint = hint;
        self
    }
    const fn example(mut self, example: &'static str) -> Self {
        self.example = Some(example);
        self
    }
    /// `section.key`.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// The tables in file order, with the comment the template puts beside each.
pub const SECTIONS: &[(&str, &str)] = &[
    ("job", ""),
    ("model", ""),
    ("network", "kohya LoRA / LoCon"),
    ("save", ""),
    ("train", ""),
    (
        "datasets",
        "one table per folder; add more [[datasets]] tables to mix folders",
    ),
    ("sample", "in-training samples (a prompts × steps grid)"),
    ("validation", "fixed-seed validation loss"),
];

/// Timestep bounds of the DDPM schedule.
const T: f64 = crate::model::schedule::NUM_TIMESTEPS as f64;

/// Every key, in template order (one line each: a table, not formatted code).
#[rustfmt::skip]
/// Every key, in template order.
pub const FIELDS: &[Field] = &[
    f("job", "name", Rule::Free, "files: <output_dir>/<name>/<name>_<step>.safetensors"),
    f("job", "id", Rule::Free, "this job's identity, kept in its saved state: --resume refuses a state another job wrote (lorakit init and lorakit ui set one; keep it when you edit)").example("\"5e1f0c2a9b7d4e63\""),
    f("job", "trigger_word", Rule::Free, "inserted first in every caption; replaces [trigger] in prompts").example("\"myakumyaku-san\""),
    f("job", "output_dir", Rule::Free, "output folder (relative to this file)"),
    f("job", "device", Rule::Free, "\"cuda\", \"cuda:N\" or \"cpu\"; default: CUDA when available").example("\"cuda\""),
    f("job", "seed", Rule::Free, "seed of everything random"),
    f("model", "arch", Rule::OneOf(&["sdxl"]), "SDXL 1.0 and fine-tunes (Illustrious, Pony, NoobAI…)"),
    f("model", "name_or_path", Rule::Free, "single-file checkpoint (.safetensors) or diffusers folder"),
    f("model", "prediction", Rule::OneOf(lora_core::Prediction::NAMES), "default: from the checkpoint (v_pred key, or a folder's scheduler config)").example("\"v_prediction\""),
    f("model", "zero_terminal_snr", Rule::Free, "rescale the noise schedule to zero terminal SNR; default: from the checkpoint (ztsnr key, or a folder's scheduler config)").example("true"),
    f("network", "type", Rule::OneOf(NetworkKind::NAMES), "lora / locon: kohya's LoRA (LoCon when conv > 0); loha / lokr: LyCORIS' LoHa (Hadamard product of two low-rank pairs) and LoKr (Kronecker product; small files), saved as LyCORIS saves them"),
    f("network", "factor", closed(-1.0, 1024.0), "LoKr: LyCORIS' factor, how the dimensions are split (-1: most balanced; 4-16 typical)"),
    f("network", "decompose_both", Rule::Free, "LoKr: make the small Kronecker factor low-rank too (LyCORIS' decompose_both)"),
    f("network", "dora", Rule::Free, "DoRA (LyCORIS' dora_wd) on any type: W' = (W + ΔW) · m / ‖W + ΔW‖ with a learned magnitude m per input channel (dora_scale), written in the form ComfyUI and A1111 apply"),
    f("network", "linear", closed(1.0, 1024.0), "rank of Linear and 1x1 conv modules"),
    f("network", "linear_alpha", POSITIVE, "alpha of those (scale = alpha / rank)"),
    f("network", "conv", closed(0.0, 1024.0), "rank of 3x3 convs (LoCon); 0 = plain LoRA"),
    f("network", "conv_alpha", POSITIVE, "alpha of 3x3 convs"),
    f("network", "dropout", RATE, "neuron dropout on the LoRA's hidden units (kohya network_dropout)"),
    f("network", "rank_dropout", RATE, "drops each rank of a module's update"),
    f("network", "module_dropout", RATE, "leaves a whole module out of a step: no output, no gradient, no update (kohya's)"),
    f("network", "block_dims", closed(0.0, 1024.0), "kohya's block_dims: 23 ranks for Linear/1x1 modules by UNet block (0 embeddings, 1-9 input_blocks, 10-12 middle_block, 13-21 output_blocks, 22 out); 0 = no LoRA there").example("[0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16, 8, 8, 8, 4, 4, 4, 0]"),
    f("network", "block_alphas", closed(0.0, 1024.0), "their 23 alphas (default: linear_alpha)").example("[0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 16, 8, 8, 8, 4, 4, 4, 0]"),
    f("network", "conv_block_dims", closed(0.0, 1024.0), "23 ranks for 3x3 convs (LoCon) by block").example("[0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0]"),
    f("network", "conv_block_alphas", closed(0.0, 1024.0), "their 23 alphas (default: conv_alpha)").example("[0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 0]"),
    f("save", "save_every", AT_LEAST_1, "a checkpoint every this many steps"),
    f("save", "max_step_saves_to_keep", AT_LEAST_1, "the newest this many step files are kept"),
    f("save", "dtype", Rule::OneOf(SaveDtype::NAMES), "dtype of the saved LoRA"),
    f("train", "batch_size", closed(1.0, 256.0), "images per micro-batch"),
    f("train", "gradient_accumulation", AT_LEAST_1, "micro-batches per optimizer step (effective batch = batch_size × this)"),
    f("train", "steps", AT_LEAST_1, "optimizer steps"),
    f("train", "lr", LEARNING_RATE, "UNet learning rate").hint("typical LoRA rates are 1e-5 to 1e-3 for adamw and adafactor, 3-10x lower for lion, 1.0 for prodigy"),
    f("train", "text_encoder_lr", LEARNING_RATE, "text-encoder learning rate (default: lr)").example("7e-5"),
    f("train", "optimizer", Rule::OneOf(OptimizerArgs::NAMES), "adamw8bit: bitsandbytes-style 8-bit moments, ¼ of the optimizer memory; lion: sign updates, one moment (lion8bit: bitsandbytes' Lion8bit, 8-bit momentum); prodigy: estimates its own step size (lr = 1.0); adafactor: factored second moments, least memory"),
    f("train", "optimizer_args", Rule::Free, "the optimizer's own settings, as its package names them: adamw betas, eps; lion betas; prodigy betas, beta3, eps, decouple, use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate, slice_p; adafactor eps, clip_threshold, decay_rate, beta1, scale_parameter, relative_step (default true: train.lr unused), warmup_init").example("{ d_coef = 1.0, use_bias_correction = true, safeguard_warmup = true }"),
    f("train", "lr_scheduler", Rule::OneOf(LrSchedule::NAMES), "learning-rate schedule"),
    f("train", "warmup_steps", Rule::Free, "warm-up steps (at most train.steps)"),
    f("train", "lr_scheduler_num_cycles", closed(1.0, 1000.0), "cosine_with_restarts: how many cosines, each restarting at the full rate (kohya's lr_scheduler_num_cycles)"),
    f("train", "weight_decay", RATE, "weight decay (decoupled, scaled by the step size); default: the optimizer's own, 0.01 for adamw / adamw8bit, 0 for lion, lion8bit, prodigy, adafactor").example("0.01"),
    f("train", "max_grad_norm", closed(0.0, INF), "gradient-norm clipping; 0 = off"),
    f("train", "noise_offset", closed(0.0, 1.0), "noise offset").hint("0.0357 is a common value"),
    f("train", "multires_noise_iterations", closed(0.0, 16.0), "kohya's multi-resolution (pyramid) noise levels; 0 = off, 6-10 typical; not with noise_offset"),
    f("train", "multires_noise_discount", closed(0.0, 1.0), "weight of each coarser pyramid level"),
    f("train", "ip_noise_gamma", closed(0.0, 1.0), "input perturbation noise (kohya ip_noise_gamma); 0 = off").hint("0.1 is the usual value"),
    f("train", "ip_noise_gamma_random_strength", Rule::Free, "draw the perturbation strength from [0, ip_noise_gamma) each step"),
    f("train", "debiased_estimation_loss", Rule::Free, "kohya's debiased estimation: weight each sample's loss by 1/√SNR (ε) or 1/(SNR+1) (v)"),
    f("train", "loraplus_lr_ratio", closed(1.0, 256.0), "LoRA+: the up matrices' rate is this many times train.lr (and text_encoder_lr)").hint("16 is the paper's value").example("16.0"),
    f("train", "ema_decay", closed(0.0, 1.0), "EMA of the LoRA weights (diffusers EMAModel); the saved files hold the average").hint("0.999 for long runs; the average lags about 1/(1 − decay) steps").example("0.999"),
    f("train", "ema_power", POSITIVE, "EMA power warm-up: decay = min(ema_decay, 1 − (1 + step)^−power)").example("0.6667"),
    f("train", "down_lr_weight", Rule::Free, "kohya's block learning rates: 9 factors on lr for input_blocks 0-8 (shallow to deep), or a preset: cosine | sine | linear | reverse_linear | zeros, optionally +base; missing values are 1; a block at 0 gets no LoRA").example("\"sine+0.25\""),
    f("train", "mid_lr_weight", closed(-100.0, 100.0), "3 factors for middle_block 0-2").example("[1.0, 0.5, 1.0]"),
    f("train", "up_lr_weight", Rule::Free, "9 factors for output_blocks 0-8 (deep to shallow), or a preset as for down_lr_weight").example("[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5]"),
    f("train", "block_lr_zero_threshold", closed(0.0, 100.0), "block weights at or below this count as 0"),
    f("train", "prior_loss_weight", closed(0.0, 100.0), "loss weight of regularisation samples (kohya's prior_loss_weight)"),
    f("train", "min_snr_gamma", POSITIVE, "min-SNR-γ loss weighting").hint("5 is the usual value").example("5.0"),
    f("train", "loss", Rule::OneOf(Loss::NAMES), "loss function"),
    f("train", "min_timestep", closed(0.0, T - 1.0), "lowest timestep drawn"),
    f("train", "max_timestep", closed(1.0, T), "highest timestep drawn (exclusive)"),
    f("train", "timestep_sampling", Rule::OneOf(TimestepSampling::NAMES), "timestep distribution (OneTrainer's): sigmoid weights steps by sigmoid(sigmoid_scale·(x − 0.5 − sigmoid_bias)); logit_normal draws sigmoid(N(sigmoid_bias, sigmoid_scale + 1))"),
    f("train", "sigmoid_scale", closed(-100.0, 100.0), "OneTrainer's noising_weight: the sigmoid's steepness (needed with sigmoid; > 0 favours noisy steps), the logit-normal's std − 1 (default 0)").example("5.0"),
    f("train", "sigmoid_bias", closed(-5.0, 5.0), "OneTrainer's noising_bias: moves the sigmoid's centre, or the logit-normal's mean"),
    f("train", "timestep_shift", closed(0.01, 100.0), "OneTrainer's timestep_shift, any distribution: t ↦ 1000·s·t/((s−1)·t + 1000); > 1 draws noisier steps, 1 = off (applied after min/max_timestep, so it can pass max_timestep)"),
    f("train", "train_unet", Rule::Free, "train the UNet's LoRA"),
    f("train", "train_text_encoder", Rule::Free, "train LoRAs on both text encoders too"),
    f("train", "dtype", Rule::OneOf(TrainDtype::NAMES), "dtype of the frozen base model").hint("fp16 is refused: without loss scaling, which lorakit does not have yet, gradients through an fp16 UNet underflow and the LoRA learns little; bf16 has fp32's range"),
    f("train", "gradient_checkpointing", Rule::Free, "true | false | \"auto\": recompute activations in backward (far less VRAM, ~30% slower); auto = on for CUDA, off on CPU"),
    f("train", "vram", Rule::OneOf(&super::vram::NAMES), "a memory preset for your GPU: fills gradient_checkpointing and (8gb, 12gb) optimizer = \"adamw8bit\" where the job leaves them unset, and caps batch_size × resolution² (8gb: 1 × 1024², 12gb: 2, 16gb: 4, 24gb: 8; max: no cap, no checkpointing)").example("\"12gb\""),
    f("train", "cache_latents", Rule::Free, "encode each image once; latents cached under the run folder"),
    f("train", "max_token_length", Rule::OneOfInt(&[75, 150, 225]), "caption tokens used (kohya's max_token_length): 75 truncates; 150/225 use 2/3 CLIP chunks"),
    f("train", "cache_text_embeddings", Rule::Free, "encode each caption once (needs static captions and frozen text encoders)"),
    f("train", "diff_output_preservation", Rule::Free, "AI Toolkit's differential output preservation: each step the LoRA's prediction for the captions with the trigger replaced by diff_output_preservation_class is pulled towards the base model's (LoRA off) on the same noisy latents, so prompts without the trigger keep the base's look; needs job.trigger_word, frozen text encoders; ~2x a plain step (one forward over twice the batch, plus a base pass without gradients)"),
    f("train", "diff_output_preservation_class", Rule::Free, "the word the trigger becomes in the preserved captions: what the character is (person, woman, creature…)").example("\"person\""),
    f("train", "diff_output_preservation_multiplier", closed(0.0, 100.0), "weight of the preservation loss"),
    f("train", "blank_prompt_preservation", Rule::Free, "AI Toolkit's blank prompt preservation: as diff_output_preservation with the empty caption instead of the class captions (not both)"),
    f("train", "blank_prompt_preservation_multiplier", closed(0.0, 100.0), "weight of the blank-prompt preservation loss"),
    f("datasets", "folder_path", Rule::Free, "images with same-name caption files"),
    f("datasets", "caption_ext", Rule::Free, "caption file extension"),
    f("datasets", "resolution", closed(64.0, 2048.0), "training resolutions, multiples of 64 (SDXL: 512–1024; 64 for the toy-world base)"),
    f("datasets", "num_repeats", AT_LEAST_1, "times each image is seen per epoch"),
    f("datasets", "caption_dropout_rate", RATE, "probability that a caption is dropped: it becomes the trigger word alone (empty without one)"),
    f("datasets", "shuffle_tokens", Rule::Free, "shuffle the tags after the first keep_tokens"),
    f("datasets", "keep_tokens", Rule::Free, "leading tags that never move (the trigger word stays first)"),
    f("datasets", "tag_dropout_rate", RATE, "probability of dropping each free tag"),
    f("datasets", "flip_x", Rule::Free, "random horizontal flips"),
    f("datasets", "random_crop", Rule::Free, "random instead of centre crops"),
    f("datasets", "mask_path", Rule::Free, "masked loss (kohya's): a folder of same-name mask images (white = learn, grey = partly, black = ignore; the red channel, same size as the image)").example("\"masks\""),
    f("datasets", "is_reg", Rule::Free, "regularisation images (prior preservation, kohya's is_reg): class images without the trigger, captioned as the class; mixed into batches, as many samples per epoch as the train images"),
    f("datasets", "alpha_mask", Rule::Free, "masked loss from each image's alpha channel (opaque = learn, transparent = ignore)"),
    f("sample", "disable", Rule::Free, "no in-training samples"),
    f("sample", "sample_every", AT_LEAST_1, "a round of samples every this many steps"),
    f("sample", "prompts", Rule::Free, "[trigger] becomes the trigger word"),
    f("sample", "negative_prompt", Rule::Free, "negative prompt"),
    f("sample", "seed", Rule::Free, "seed of every sample"),
    f("sample", "guidance_scale", Rule::Free, "CFG scale"),
    f("sample", "sample_steps", AT_LEAST_1, "sampler steps"),
    f("sample", "sampler", Rule::Free, "euler | euler_ancestral | dpmpp_2m | dpmpp_2m_karras | ddim"),
    f("sample", "width", Rule::Free, "multiple of 8"),
    f("sample", "height", Rule::Free, "multiple of 8"),
    f("sample", "strength", closed(-4.0, 4.0), "LoRA strength of the samples").hint("usually 0.6 to 1.0"),
    f("validation", "every", AT_LEAST_1, "steps between validation losses (default: save.save_every)").example("100"),
    f("validation", "images", AT_LEAST_1, "images in the fixed validation set").example("4"),
    f("validation", "seed", Rule::Free, "seed of its noise and timesteps (default: from job.seed)").example("1234"),
];

/// The keys valid in `section` (`""`: the top-level table names).
pub fn keys_of(section: &str) -> Vec<&'static str> {
    if section.is_empty() {
        return SECTIONS.iter().map(|(s, _)| *s).collect();
    }
    FIELDS
        .iter()
        .filter(|f| f.section == section)
        .map(|f| f.key)
        .collect()
}
