//! Value checks: first every key's own rule from [`super::fields::FIELDS`]
//! (choices and ranges), then the checks that involve files or several keys.

use super::fields::{Rule, FIELDS};
use super::{JobConfig, JobError};
use crate::train::plan::{NetworkKind, Plan};
use crate::train::timesteps::TimestepSampling;
use std::path::Path;

/// The first value that breaks its field's rule, as `(field path, message)`.
fn rule_error(cfg: &JobConfig) -> Option<(String, String)> {
    let value = toml::Value::try_from(cfg).ok()?;
    for field in FIELDS {
        let tables: Vec<(String, &toml::Value)> = match value.get(field.section) {
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("{}[{i}].{}", field.section, field.key), t))
                .collect(),
            Some(t) => vec![(field.path(), t)],
            None => continue,
        };
        for (path, table) in tables {
            let Some(v) = table.get(field.key) else {
                continue; // an unset Option
            };
            if let Some(message) = check(field.rule, v) {
                let hint = if field.hint.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", field.hint)
                };
                return Some((path, format!("{message}{hint}")));
            }
        }
    }
    None
}

/// Why `v` breaks `rule`, if it does (arrays: each element).
fn check(rule: Rule, v: &toml::Value) -> Option<String> {
    match (rule, v) {
        (_, toml::Value::Array(items)) => items.iter().find_map(|e| check(rule, e)),
        (Rule::OneOf(allowed), toml::Value::String(s)) if !allowed.contains(&s.as_str()) => {
            Some(format!("`{s}` is not one of: {}", allowed.join(", ")))
        }
        (Rule::OneOfInt(allowed), toml::Value::Integer(i)) if !allowed.contains(i) => {
            Some(format!(
                "{i} is not one of: {}",
                rule.describe().unwrap_or_default().replace(" | ", ", ")
            ))
        }
        (Rule::Range { .. }, toml::Value::Integer(_) | toml::Value::Float(_)) => {
            let x = v.as_float().or_else(|| v.as_integer().map(|i| i as f64))?;
            (!rule.allows_number(x))
                .then(|| format!("{x} must be in {}", rule.describe().unwrap_or_default()))
        }
        _ => None,
    }
}

fn fail<T>(file: &Path, field: &str, message: String) -> Result<T, JobError> {
    Err(JobError {
        file: file.to_path_buf(),
        field: field.into(),
        message,
    })
}

impl JobConfig {
    /// Checks every value (ranges, choices, files). Does not open the model
    /// or scan the datasets (see the trainer for those checks).
    pub fn validate(&self, file: &Path) -> Result<Plan, JobError> {
        let err = |field: &str, message: String| fail(file, field, message);
        if let Some((field, message)) = rule_error(self) {
            return err(&field, message);
        }
        let job = &self.job;
        if job.name.trim().is_empty() || job.name.contains(['/', '\\']) {
            return err(
                "job.name",
                "must be a non-empty file name (no slashes)".into(),
            );
        }
        if let Some(d) = &job.device {
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
        let plan = Plan::resolve(self, file)?;
        self.validate_network(&plan, file)?;
        self.validate_train(&plan, file)?;
        self.validate_datasets(&plan, file)?;
        self.validate_sample(&plan, file)?;
        Ok(plan)
    }

    /// `network.type` and the settings that only some types use.
    fn validate_network(&self, plan: &Plan, file: &Path) -> Result<(), JobError> {
        let err = |field: &str, message: String| fail(file, field, message);
        let network = &self.network;
        // LyCORIS' modules (and DoRA's decomposed weight) offer module dropout only
        let lyco = plan.network.is_lycoris() || plan.dora;
        if plan.network == NetworkKind::Locon
            && network.conv == 0
            && network.conv_block_dims.is_none()
        {
            return err("network.conv", "network.type = \"locon\" needs a conv rank: set conv (e.g. 8), or use type = \"lora\"".into());
        }
        if plan.network != NetworkKind::Lokr && (network.factor != -1 || network.decompose_both) {
            let field = if network.factor != -1 {
                "network.factor"
            } else {
                "network.decompose_both"
            };
            return err(
                field,
                format!(
                    "is a LoKr setting and has no effect with network.type = \"{}\"",
                    plan.network.name()
                ),
            );
        }
        if network.factor == 0 {
            return err(
                "network.factor",
                "must be -1 (the most balanced split) or at least 1".into(),
            );
        }
        let unsupported = [
            ("network.dropout", network.dropout > 0.0),
            ("network.rank_dropout", network.rank_dropout > 0.0),
            (
                "train.loraplus_lr_ratio",
                self.train.loraplus_lr_ratio.is_some(),
            ),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, on)| lyco && *on) {
            let with = if network.dora {
                "network.dora".to_string()
            } else {
                format!("network.type = \"{}\"", plan.network.name())
            };
            return err(field, format!("is not available with {with} (LyCORIS offers module_dropout; LoRA+ needs lora_up matrices alone): remove it"));
        }
        Ok(())
    }

    fn validate_train(&self, plan: &Plan, file: &Path) -> Result<(), JobError> {
        let err = |field: &str, message: String| fail(file, field, message);
        let train = &self.train;
        if train.warmup_steps > train.steps {
            return err(
                "train.warmup_steps",
                format!(
                    "{} is more than train.steps ({})",
                    train.warmup_steps, train.steps
                ),
            );
        }
        if train.min_timestep >= train.max_timestep {
            return err(
                "train.min_timestep",
                format!(
                    "need 0 ≤ min_timestep < max_timestep ≤ 1000, got {}..{}",
                    train.min_timestep, train.max_timestep
                ),
            );
        }
        let prodigy = matches!(
            plan.optimizer,
            crate::train::optim::OptimizerArgs::Prodigy(_)
        );
        if !prodigy && train.lr >= 0.1 {
            return err(
                "train.lr",
                format!("{} is far too high for {} (typical LoRA rates are 1e-5 to 1e-3; 1.0 is Prodigy's rate: train.optimizer = \"prodigy\")", train.lr, train.optimizer),
            );
        }
        // Adafactor's relative step sets each parameter's step from its own
        // scale, ignoring every rate (issue 28: group rates were accepted
        // and had no effect; kohya drops them with a warning)
        let relative = matches!(
            &plan.optimizer,
            crate::train::optim::OptimizerArgs::Adafactor(c) if c.relative_step
        );
        let relative_why =
            "adafactor with relative_step = true (its default) computes every step size itself, so";
        let relative_fix = "set optimizer_args = { relative_step = false, scale_parameter = false } to use the rates (kohya's SDXL recipe)";
        if relative && train.loraplus_lr_ratio.is_some() {
            return err(
                "train.loraplus_lr_ratio",
                format!("{relative_why} LoRA+'s higher rate for the up matrices has no effect: {relative_fix}, or remove loraplus_lr_ratio"),
            );
        }
        if relative
            && train.train_text_encoder
            && train.text_encoder_lr.is_some_and(|r| r != train.lr)
        {
            return err(
                "train.text_encoder_lr",
                format!("{relative_why} the text encoders' own rate has no effect: {relative_fix}, or remove text_encoder_lr"),
            );
        }
        if prodigy && train.loraplus_lr_ratio.is_some() {
            return err(
                "train.loraplus_lr_ratio",
                "prodigy takes one rate for every parameter, and LoRA+ needs a higher one for the up matrices: remove loraplus_lr_ratio or use another optimizer".into(),
            );
        }
        let blocks =
            crate::train::blocks::BlockPlan::new(&self.network, train).map_err(|(field, m)| {
                JobError {
                    file: file.to_path_buf(),
                    field: field.into(),
                    message: m,
                }
            })?;
        if prodigy && blocks.as_ref().is_some_and(|p| p.lr_weights.is_some()) {
            return err(
                "train.down_lr_weight",
                "prodigy takes one rate for every parameter, so block learning-rate weights would change its estimate rather than the blocks' rates: remove down/mid/up_lr_weight or use another optimizer".into(),
            );
        }
        // a weight of 0 still acts (that block gets no LoRA); others would not
        let scaled = |w: &[f64]| w.iter().any(|&w| w != 0.0 && w != 1.0);
        if relative
            && blocks
                .as_ref()
                .and_then(|p| p.lr_weights)
                .is_some_and(|w| scaled(&w))
        {
            return err(
                "train.down_lr_weight",
                format!("{relative_why} block learning-rate weights other than 0 (no LoRA in the block) and 1 have no effect: {relative_fix}, or keep only 0 and 1"),
            );
        }
        if blocks
            .as_ref()
            .is_some_and(|p| p.dims.iter().chain(&p.conv_dims).all(|&d| d == 0))
            && !train.train_text_encoder
        {
            return err(
                "network.block_dims",
                "every block's rank (or rate weight) is 0, so there is nothing to train: give some blocks a rank".into(),
            );
        }
        if prodigy
            && train.train_text_encoder
            && train.text_encoder_lr.is_some_and(|r| r != train.lr)
        {
            return err(
                "train.text_encoder_lr",
                "prodigy estimates one step size for the UNet and the text encoders together, so their rates must be equal: leave text_encoder_lr unset".into(),
            );
        }
        if train.multires_noise_iterations > 0 && train.noise_offset > 0.0 {
            return err(
                "train.multires_noise_iterations",
                "kohya uses multires noise only without a noise offset, so one of them would have no effect: set noise_offset = 0 or multires_noise_iterations = 0".into(),
            );
        }
        if train.ip_noise_gamma_random_strength && train.ip_noise_gamma == 0.0 {
            return err(
                "train.ip_noise_gamma_random_strength",
                "has no effect while ip_noise_gamma = 0: set ip_noise_gamma (e.g. 0.1)".into(),
            );
        }
        self.validate_timesteps(plan, file)?;
        let restarts = crate::train::schedule::LrSchedule::CosineWithRestarts;
        if train.lr_scheduler_num_cycles != 1 && plan.schedule != restarts {
            return err(
                "train.lr_scheduler_num_cycles",
                format!(
                    "has no effect with lr_scheduler = \"{}\": use lr_scheduler = \"cosine_with_restarts\" or set it to 1",
                    train.lr_scheduler
                ),
            );
        }
        if train.text_encoder_lr.is_some() && !train.train_text_encoder {
            return err(
                "train.text_encoder_lr",
                "has no effect while train_text_encoder = false: set train_text_encoder = true or remove text_encoder_lr".into(),
            );
        }
        let block_weights = train.down_lr_weight.is_some()
            || train.mid_lr_weight.is_some()
            || train.up_lr_weight.is_some();
        if train.block_lr_zero_threshold != 0.0 && !block_weights {
            return err(
                "train.block_lr_zero_threshold",
                "has no effect without block learning-rate weights: set down_lr_weight / mid_lr_weight / up_lr_weight, or block_lr_zero_threshold = 0".into(),
            );
        }
        if train.ema_power.is_some() && train.ema_decay.is_none() {
            return err(
                "train.ema_power",
                "has no effect without train.ema_decay: set ema_decay (e.g. 0.999) or remove ema_power".into(),
            );
        }
        if !train.train_unet && !train.train_text_encoder {
            return err(
                "train.train_unet",
                "nothing to train: enable train_unet and/or train_text_encoder".into(),
            );
        }
        if train.cache_text_embeddings && train.train_text_encoder {
            return err(
                "train.cache_text_embeddings",
                "cannot cache text embeddings while training the text encoders".into(),
            );
        }
        Ok(())
    }

    /// `timestep_sampling`'s parameters must each change the distribution.
    fn validate_timesteps(&self, plan: &Plan, file: &Path) -> Result<(), JobError> {
        let err = |field: &str, message: String| fail(file, field, message);
        let train = &self.train;
        match plan.timesteps {
            TimestepSampling::Sigmoid if train.sigmoid_scale.unwrap_or(0.0) == 0.0 => err(
                "train.sigmoid_scale",
                "timestep_sampling = \"sigmoid\" needs a non-zero sigmoid_scale (a flat sigmoid is uniform): set e.g. sigmoid_scale = 5.0".into(),
            ),
            TimestepSampling::LogitNormal if train.sigmoid_scale.is_some_and(|s| s <= -1.0) => err(
                "train.sigmoid_scale",
                "the logit-normal's standard deviation is sigmoid_scale + 1, so it must be above -1 (0 gives a standard normal)".into(),
            ),
            TimestepSampling::Uniform if train.sigmoid_scale.is_some() || train.sigmoid_bias != 0.0 => err(
                if train.sigmoid_scale.is_some() { "train.sigmoid_scale" } else { "train.sigmoid_bias" },
                "has no effect with timestep_sampling = \"uniform\": set timestep_sampling = \"sigmoid\" or \"logit_normal\", or remove it".into(),
            ),
            _ => Ok(()),
        }
    }

    fn validate_datasets(&self, plan: &Plan, file: &Path) -> Result<(), JobError> {
        let err = |field: &str, message: String| fail(file, field, message);
        if self.datasets.is_empty() {
            return err(
                "datasets",
                "add at least one [[datasets]] table with folder_path".into(),
            );
        }
        let reg = self.datasets.iter().filter(|d| d.is_reg).count();
        if reg == self.datasets.len() {
            return err(
                "datasets",
                "every [[datasets]] entry is is_reg = true: add the character's images as a dataset without is_reg".into(),
            );
        }
        if reg == 0 && self.train.prior_loss_weight != 1.0 {
            return err(
                "train.prior_loss_weight",
                "has no effect without regularisation images: add a [[datasets]] entry with is_reg = true, or remove it".into(),
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
            if let Some(r) = d.resolution.iter().find(|r| **r % 64 != 0) {
                return err(
                    &f("resolution"),
                    format!("{r} must be a multiple of 64 between 64 and 2048"),
                );
            }
            let preset = plan.vram;
            let largest = d.resolution.iter().copied().max().unwrap_or(0);
            // output preservation forwards the batch twice, concatenated
            let rows = self.train.batch_size * plan.preservation.rows_per_item();
            if let Some(e) = preset.and_then(|p| p.batch_error(rows, largest)) {
                let doubled = match rows == self.train.batch_size {
                    true => "",
                    false => "; output preservation runs 2 × batch_size rows per forward",
                };
                return err(
                    "train.batch_size",
                    format!("{e} (datasets[{i}].resolution{doubled})"),
                );
            }
            if let Some(m) = &d.mask_path {
                if d.alpha_mask {
                    return err(&f("alpha_mask"), "a dataset takes its masks from mask_path or from the alpha channel, not both: remove one".into());
                }
                if !m.is_dir() {
                    return err(&f("mask_path"), format!("`{}` is not a folder (it holds one mask image per training image, same names)", m.display()));
                }
            }
            if self.train.cache_text_embeddings {
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
        Ok(())
    }

    fn validate_sample(&self, plan: &Plan, file: &Path) -> Result<(), JobError> {
        let err = |field: &str, message: String| fail(file, field, message);
        let sample = &self.sample;
        if let Err(crate::SdxlError::Param { name, reason }) =
            sample.generate_params(plan.sampler, "", None).validate()
        {
            let field = match name {
                "steps" => "sample_steps",
                "cfg" => "guidance_scale",
                other => other,
            };
            return err(&format!("sample.{field}"), reason);
        }
        if !sample.disable && sample.prompts.is_empty() {
            return err(
                "sample.prompts",
                "sampling is enabled but there are no prompts".into(),
            );
        }
        Ok(())
    }
}
