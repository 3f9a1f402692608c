//! The LoRA files a run writes: `<name>_<step:09>.safetensors` at every save
//! and `<name>.safetensors` at the end, in kohya's format with kohya's `ss_*`
//! and `modelspec.*` metadata (written atomically by `LoraSet::save`).

use super::data::Data;
use super::job::JobConfig;
use super::network::Network;
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

/// kohya's training metadata for a LoRA saved at `step`.
pub(crate) fn training_metadata(
    job: &JobConfig,
    data: &Data,
    prediction: Prediction,
    step: u64,
    epoch: u64,
    started_at: f64,
    last: bool,
) -> TrainingMetadata {
    let name = &job.job.name;
    let mut tags: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (d, ds) in job.datasets.iter().enumerate() {
        let mut st = TagStats::default();
        for (img, _) in data
            .images
            .iter()
            .zip(&data.dataset_of)
            .filter(|(_, &x)| x == d)
        {
            st.add(&img.caption);
        }
        let folder = ds
            .folder_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        tags.insert(
            format!("{}_{folder}", ds.num_repeats),
            st.counts.into_iter().map(|(k, v)| (k, v as u64)).collect(),
        );
    }
    let res = job.datasets[0]
        .resolution
        .iter()
        .copied()
        .max()
        .unwrap_or(1024);
    let now = lora_core::metadata::now_unix();
    let n = &job.network;
    TrainingMetadata {
        output_name: name.clone(),
        network_dim: n.linear,
        network_alpha: n.linear_alpha,
        conv_dim: (n.conv > 0).then_some(n.conv),
        conv_alpha: (n.conv > 0).then_some(n.conv_alpha),
        network_dropout: (n.dropout > 0.0).then_some(n.dropout),
        rank_dropout: (n.rank_dropout > 0.0).then_some(n.rank_dropout),
        module_dropout: (n.module_dropout > 0.0).then_some(n.module_dropout),
        steps: step,
        epoch,
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
            (
                "ss_lr_scheduler".to_string(),
                job.train.lr_scheduler.clone(),
            ),
            (
                "ss_optimizer".to_string(),
                format!("lorakit.AdamW(weight_decay={})", job.train.weight_decay),
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
                "ss_num_train_images".to_string(),
                data.images.len().to_string(),
            ),
        ]),
    }
}

/// Writes the LoRA of `step` with its metadata and returns its path.
pub(crate) fn save_lora(
    job: &JobConfig,
    run_dir: &Path,
    network: &Network,
    step: u64,
    last: bool,
    md: &TrainingMetadata,
) -> Result<PathBuf> {
    let kind = lora_core::io::kind_from_name(&job.save.dtype).unwrap_or(tch::Kind::Float);
    let path = checkpoint_path(run_dir, &job.job.name, step, last);
    network.to_set()?.save(&path, kind, &md.to_map())?;
    Ok(path)
}
