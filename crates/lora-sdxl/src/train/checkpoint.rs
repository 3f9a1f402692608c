//! The LoRA files a run writes: `<name>_<step:09>.safetensors` at every save
//! and `<name>.safetensors` at the end, in kohya's format with kohya's `ss_*`
//! and `modelspec.*` metadata (written atomically by `LoraSet::save`).

use super::data::Data;
use super::ema::Ema;
use super::job::JobConfig;
use super::network::Network;
use super::plan::{NetworkKind, Plan};
use crate::error::Result;
use lora_core::{Prediction, TrainingMetadata};
use lora_data::caption::TagStats;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file of a step's checkpoint (`last`: the final `<name>.safetensors`).
pub fn checkpoint_path(run_dir: &Path, name: &str, step: u64, last: bool) -> PathBuf {
    if last {
        run_dir.join(format!("{name}.safetensors"))
    } else {
        run_dir.join(format!("{name}_{step:09}.safetensors"))
    }
}

/// The step of a step checkpoint of run `name` from its file name
/// (`<name>_<step:09>.safetensors`, the inverse of [`checkpoint_path`]);
/// `None` for any other file, the final `<name>.safetensors` included.
pub fn checkpoint_step_of(file_name: &str, name: &str) -> Option<u64> {
    file_name
        .strip_prefix(name)?
        .strip_prefix('_')?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// kohya's training metadata for a LoRA saved at `step`.
pub(crate) fn training_metadata(
    (job, plan): (&JobConfig, &Plan),
    data: &Data,
    (prediction, zero_terminal_snr): (Prediction, bool),
    step: u64,
    (epoch, epoch_started): (u64, bool),
    started_at: f64,
    last: bool,
) -> TrainingMetadata {
    let name = &job.job.name;
    let tags = tag_frequency(job, data);
    let res = job.datasets[0]
        .resolution
        .iter()
        .copied()
        .max()
        .unwrap_or(1024);
    let now = lora_core::metadata::now_unix();
    let network = &job.network;
    let mut md = TrainingMetadata {
        output_name: name.clone(),
        network_dim: network.linear,
        network_alpha: network.linear_alpha,
        conv_dim: (network.conv > 0).then_some(network.conv),
        conv_alpha: (network.conv > 0).then_some(network.conv_alpha),
        network_dropout: (network.dropout > 0.0).then_some(network.dropout),
        rank_dropout: (network.rank_dropout > 0.0).then_some(network.rank_dropout),
        module_dropout: (network.module_dropout > 0.0).then_some(network.module_dropout),
        network_module: (plan.network.is_lycoris() || plan.dora)
            .then(|| "lycoris.kohya".to_string()),
        network_args: network_args(plan, network, &job.train),
        steps: step,
        // kohya: the 0-based epoch in progress for step saves, the number of
        // epochs run for the final save
        epoch: if last && epoch_started {
            epoch + 1
        } else {
            epoch
        },
        max_train_steps: Some(job.train.steps),
        learning_rate: job.train.lr,
        text_encoder_lr: job
            .train
            .train_text_encoder
            .then_some(job.train.text_encoder_lr.unwrap_or(job.train.lr)),
        resolution: (res, res),
        tag_frequency: tags,
        bucket_info: None,
        seed: job.job.seed,
        training_started_at: started_at,
        training_finished_at: last.then_some(now),
        sd_model_name: job
            .model
            .name_or_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned()),
        prediction,
        trigger_phrase: job.job.trigger_word.clone(),
        title: None,
        extra: BTreeMap::from([
            (
                "ss_gradient_accumulation_steps".to_string(),
                job.train.gradient_accumulation.to_string(),
            ),
            // the name the job gave, as kohya echoes it (the plan's may
            // differ: constant with a warm-up runs as constant_with_warmup)
            (
                "ss_lr_scheduler".to_string(),
                job.train.lr_scheduler.clone(),
            ),
            (
                "ss_optimizer".to_string(),
                plan.optimizer.describe(plan.weight_decay),
            ),
            (
                "ss_max_token_length".to_string(),
                match job.train.max_token_length {
                    75 => "None".to_string(),
                    network => network.to_string(),
                },
            ),
            (
                "ss_noise_offset".to_string(),
                lora_core::metadata::py_float(job.train.noise_offset),
            ),
            (
                "ss_min_snr_gamma".to_string(),
                lora_core::metadata::py_opt_float(job.train.min_snr_gamma),
            ),
            (
                "ss_multires_noise_iterations".to_string(),
                match job.train.multires_noise_iterations {
                    0 => "None".to_string(),
                    network => network.to_string(),
                },
            ),
            (
                "ss_multires_noise_discount".to_string(),
                lora_core::metadata::py_float(job.train.multires_noise_discount),
            ),
            (
                "ss_ip_noise_gamma".to_string(),
                lora_core::metadata::py_opt_float(
                    (job.train.ip_noise_gamma > 0.0).then_some(job.train.ip_noise_gamma),
                ),
            ),
            (
                "ss_ip_noise_gamma_random_strength".to_string(),
                lora_core::metadata::py_bool(job.train.ip_noise_gamma_random_strength),
            ),
            (
                "ss_debiased_estimation".to_string(),
                lora_core::metadata::py_bool(job.train.debiased_estimation_loss),
            ),
            (
                "ss_timestep_sampling".to_string(),
                plan.timesteps.name().to_string(),
            ),
            (
                "ss_sigmoid_scale".to_string(),
                lora_core::metadata::py_float(job.train.sigmoid_scale.unwrap_or(0.0)),
            ),
            (
                "lorakit.sigmoid_bias".to_string(),
                lora_core::metadata::py_float(job.train.sigmoid_bias),
            ),
            (
                "lorakit.timestep_shift".to_string(),
                lora_core::metadata::py_float(job.train.timestep_shift),
            ),
            (
                "ss_loraplus_lr_ratio".to_string(),
                lora_core::metadata::py_opt_float(job.train.loraplus_lr_ratio),
            ),
            (
                // kohya: images × repeats
                "ss_num_train_images".to_string(),
                (data.images.iter().enumerate())
                    .filter(|(i, _)| !data.is_reg[data.dataset_of[*i]])
                    .map(|(_, img)| u64::from(img.repeats))
                    .sum::<u64>()
                    .to_string(),
            ),
            // kohya: reg images × their repeats, before the balance
            ("ss_num_reg_images".to_string(), data.reg_images.to_string()),
            (
                "ss_prior_loss_weight".to_string(),
                lora_core::metadata::py_float(job.train.prior_loss_weight),
            ),
        ]),
    };
    md.extra
        .extend(objective_metadata(job, plan, zero_terminal_snr));
    md.extra.extend(plan.preservation.metadata());
    md
}

/// kohya's keys for the objective and the optimisation around it (issue
/// 28: missing, so metadata viewers showed a Huber or zero-terminal-SNR run
/// as a plain one): the loss and its Huber schedule, zero-terminal SNR as
/// the run used it, gradient clipping, the warm-up, caption dropout.
fn objective_metadata(
    job: &JobConfig,
    plan: &Plan,
    zero_terminal_snr: bool,
) -> Vec<(String, String)> {
    use lora_core::metadata::{py_bool, py_float};
    let train = &job.train;
    // the first training dataset's (kohya has one global rate)
    let caption_dropout = (job.datasets.iter())
        .find(|d| !d.is_reg)
        .map_or(0.0, |d| d.caption_dropout_rate);
    let mut keys = vec![
        ("ss_loss_type", plan.loss.name().to_string()),
        ("ss_zero_terminal_snr", py_bool(zero_terminal_snr)),
        ("ss_max_grad_norm", py_float(train.max_grad_norm)),
        ("ss_lr_warmup_steps", train.warmup_steps.to_string()),
        ("ss_caption_dropout_rate", py_float(caption_dropout)),
    ];
    if plan.loss == super::plan::Loss::Huber {
        // lorakit's Huber is kohya's default: the "snr" schedule
        // c = (1 − huber_c)/(1 + σ_t)² + huber_c, huber_c = 0.1, scale 1
        keys.push(("ss_huber_schedule", "snr".to_string()));
        keys.push(("ss_huber_c", py_float(0.1)));
        keys.push(("ss_huber_scale", py_float(1.0)));
    }
    keys.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// `ss_network_args` beyond conv and dropouts: LyCORIS' `algo` (and LoKr's
/// `factor`, `decompose_both`, as LyCORIS' kohya wrapper takes them, all
/// strings) and the block-wise settings.
fn network_args(
    plan: &Plan,
    network: &crate::train::job::NetworkSection,
    train: &crate::train::job::TrainSection,
) -> Vec<(String, String)> {
    let mut args = Vec::new();
    if plan.network.is_lycoris() {
        args.push(("algo".to_string(), plan.network.name().to_string()));
    } else if plan.dora {
        args.push(("algo".to_string(), "lora".to_string()));
    }
    if plan.dora {
        // the input-axis form (see lora_core::dora)
        args.push(("dora_wd".to_string(), "True".to_string()));
        args.push(("wd_on_output".to_string(), "False".to_string()));
    }
    if plan.network == NetworkKind::Lokr {
        let (factor, decompose_both) = plan.lokr;
        args.push(("factor".to_string(), factor.to_string()));
        if decompose_both {
            // LyCORIS passes this one raw: any non-empty string turns it on
            args.push(("decompose_both".to_string(), "True".to_string()));
        }
    }
    args.extend(crate::train::blocks::BlockPlan::network_args(
        network, train,
    ));
    args
}

/// `ss_tag_frequency` as kohya writes it: per dataset folder (a kohya
/// `N_name` repeat folder by its name, images at a dataset's root as
/// `<num_repeats>_<folder>`), each tag counted once per image, from the
/// captions as trained — with the trigger word inserted where training
/// inserts it (not into regularisation captions).
fn tag_frequency(job: &JobConfig, data: &Data) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut stats: BTreeMap<String, TagStats> = BTreeMap::new();
    for (img, &d) in data.images.iter().zip(&data.dataset_of) {
        let ds = &job.datasets[d];
        let key = if img.group == "." || img.group.is_empty() {
            let folder = ds
                .folder_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("{}_{folder}", ds.num_repeats)
        } else {
            img.group.clone()
        };
        let caption = data.captions[d].base(&img.caption);
        stats.entry(key).or_default().add(&caption);
    }
    stats
        .into_iter()
        .map(|(k, st)| {
            (
                k,
                st.counts.into_iter().map(|(t, n)| (t, n as u64)).collect(),
            )
        })
        .collect()
}

/// Writes the LoRA of `step` with its metadata and returns its path.
pub(crate) fn save_lora(
    (job, plan): (&JobConfig, &Plan),
    run_dir: &Path,
    network: &Network,
    ema: Option<&Ema>,
    step: u64,
    last: bool,
    md: &TrainingMetadata,
) -> Result<PathBuf> {
    let kind = plan.save_dtype.kind();
    let path = checkpoint_path(run_dir, &job.job.name, step, last);
    let mut meta = md.to_map();
    if let Some(e) = ema {
        meta.insert(
            "lorakit.ema_decay".into(),
            lora_core::metadata::py_float(e.decay),
        );
    }
    let full = network.full_kron_modules().len();
    if full > 0 {
        // ss_network_alpha is the job's; these modules use scale 1
        meta.insert("lorakit.lokr_scale_1_modules".into(), full.to_string());
    }
    network
        .to_set(ema.map(Ema::weights))?
        .save(&path, kind, &meta)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip() {
        let dir = Path::new("out");
        let name_of = |p: PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
        let f = name_of(checkpoint_path(dir, "run", 300, false));
        assert_eq!(f, "run_000000300.safetensors");
        assert_eq!(checkpoint_step_of(&f, "run"), Some(300));
        // the final file, another run's files and other files are not step files
        assert_eq!(
            checkpoint_step_of(&name_of(checkpoint_path(dir, "run", 300, true)), "run"),
            None
        );
        assert_eq!(
            checkpoint_step_of("run2_000000001.safetensors", "run"),
            None
        );
        assert_eq!(checkpoint_step_of("state.safetensors", "run"), None);
    }
}
