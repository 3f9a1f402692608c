//! What the trainer knows about its data: the scanned datasets, their
//! caption rules and bucket plans, the epoch order and the fixed validation
//! set. Every order is seeded by `(seed, epoch)`, so a resumed run sees the
//! same batches.

use super::job::JobConfig;
use crate::error::{Result, SdxlError};
use lora_data::caption::CaptionProcessing;
use lora_data::loader::{derived_rng, plan_epoch, PlannedBatch};
use lora_data::masks::MaskSource;
use lora_data::{ImageEntry, PlanConfig, ScanOptions, Severity};
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;

/// A training error that is not about one file.
pub(crate) fn terr(reason: impl Into<String>) -> SdxlError {
    SdxlError::Checkpoint {
        path: PathBuf::new(),
        reason: reason.into(),
    }
}

/// One item of a planned batch: which image, from which dataset.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub image: usize,
    pub dataset: usize,
}

/// A planned batch and the dataset of each of its items.
pub(crate) type Batch = (PlannedBatch, Vec<Sample>);

/// How many usable images one `[[datasets]]` folder gave.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DatasetSummary {
    /// The folder.
    pub folder: PathBuf,
    /// Images that will be trained on.
    pub usable: usize,
    /// Image files found.
    pub files: usize,
}

/// Everything the loop needs about the data.
pub(crate) struct Data {
    /// Shared with the prefetch thread.
    pub images: Arc<Vec<ImageEntry>>,
    pub dataset_of: Vec<usize>,
    pub plans: Vec<PlanConfig>,
    pub captions: Vec<CaptionProcessing>,
    pub summaries: Vec<DatasetSummary>,
}

impl Data {
    /// Scans every `[[datasets]]` folder of the job; files that cannot be
    /// used are skipped with a warning naming them.
    pub fn scan(job: &JobConfig) -> Result<Self> {
        let mut data = Data {
            images: Arc::new(Vec::new()),
            dataset_of: Vec::new(),
            plans: Vec::new(),
            captions: Vec::new(),
            summaries: Vec::new(),
        };
        let mut images = Vec::new();
        for (d, ds) in job.datasets.iter().enumerate() {
            let scan = lora_data::scan(
                &ds.folder_path,
                &ScanOptions {
                    caption_ext: ds.caption_ext.clone(),
                    num_repeats: ds.num_repeats,
                    mask: match (&ds.mask_path, ds.alpha_mask) {
                        (Some(folder), _) => Some(MaskSource::Folder(folder.clone())),
                        (None, true) => Some(MaskSource::Alpha),
                        (None, false) => None,
                    },
                    ..Default::default()
                },
            )
            .map_err(|e| terr(e.to_string()))?;
            for p in scan
                .problems
                .iter()
                .filter(|p| p.severity == Severity::Error)
            {
                tracing::warn!(
                    "skipping {}: {}",
                    ds.folder_path.join(&p.file).display(),
                    p.message
                );
            }
            data.summaries.push(DatasetSummary {
                folder: ds.folder_path.clone(),
                usable: scan.images.len(),
                files: scan.image_files,
            });
            data.dataset_of
                .extend(std::iter::repeat_n(d, scan.images.len()));
            images.extend(scan.images);
            data.plans.push(PlanConfig {
                resolutions: ds.resolution.clone(),
                batch_size: job.train.batch_size,
                flip_x: ds.flip_x,
                random_crop: ds.random_crop,
                seed: job.job.seed,
            });
            data.captions.push(CaptionProcessing {
                trigger: job.job.trigger_word.clone(),
                keep_tokens: ds.keep_tokens,
                shuffle: ds.shuffle_tokens,
                caption_dropout_rate: ds.caption_dropout_rate,
                tag_dropout_rate: ds.tag_dropout_rate,
            });
        }
        if images.is_empty() {
            let dirs: Vec<String> = job
                .datasets
                .iter()
                .map(|d| d.folder_path.display().to_string())
                .collect();
            return Err(terr(format!(
                "no usable image in {}: nothing to train on (run `lorakit dataset check` on the folder)",
                dirs.join(", ")
            )));
        }
        data.images = Arc::new(images);
        Ok(data)
    }

    /// The images of dataset `d` (indices into `images`).
    fn indices_of(&self, d: usize) -> Vec<usize> {
        (0..self.images.len())
            .filter(|&i| self.dataset_of[i] == d)
            .collect()
    }

    /// The epoch's batches over every dataset (each planned with its own
    /// resolutions), shuffled together.
    pub fn epoch(&self, epoch: u64, seed: u64) -> Vec<Batch> {
        let mut all = Vec::new();
        for (d, plan) in self.plans.iter().enumerate() {
            let idx = self.indices_of(d);
            let imgs: Vec<ImageEntry> = idx.iter().map(|&i| self.images[i].clone()).collect();
            let plan = PlanConfig {
                seed: plan.seed.wrapping_add(d as u64),
                ..plan.clone()
            };
            for mut b in plan_epoch(&imgs, &plan, epoch) {
                for it in &mut b.items {
                    it.image = idx[it.image];
                }
                let samples = b
                    .items
                    .iter()
                    .map(|it| Sample {
                        image: it.image,
                        dataset: d,
                    })
                    .collect();
                all.push((b, samples));
            }
        }
        let mut rng = derived_rng(seed, &[2, epoch]);
        for i in (1..all.len()).rev() {
            let j = rng.gen_range(0..=i);
            all.swap(i, j);
        }
        all
    }

    /// Samples per epoch: images × repeats × resolutions.
    pub fn samples_per_epoch(&self) -> u64 {
        self.plans
            .iter()
            .enumerate()
            .map(|(d, p)| {
                let reps: u64 = self
                    .indices_of(d)
                    .iter()
                    .map(|&i| self.images[i].repeats as u64)
                    .sum();
                reps * p.resolutions.len() as u64
            })
            .sum()
    }

    /// The fixed validation set: the first `n` distinct images of the first
    /// dataset in its epoch-0 plan, centre-cropped, unflipped, one per batch.
    pub fn validation_set(&self, n: usize) -> Vec<Batch> {
        let plan = PlanConfig {
            flip_x: false,
            random_crop: false,
            batch_size: 1,
            ..self.plans[0].clone()
        };
        let idx = self.indices_of(0);
        let imgs: Vec<ImageEntry> = idx.iter().map(|&i| self.images[i].clone()).collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut v = Vec::new();
        for b in plan_epoch(&imgs, &plan, 0) {
            if v.len() >= n {
                break;
            }
            let it = &b.items[0];
            if seen.insert(it.image) {
                v.push((
                    b.clone(),
                    vec![Sample {
                        image: it.image,
                        dataset: 0,
                    }],
                ));
            }
        }
        v
    }
}
