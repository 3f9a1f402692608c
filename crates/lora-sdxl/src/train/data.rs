//! What the trainer knows about its data: the scanned datasets, their
//! caption rules and bucket plans, the epoch order and the fixed validation
//! set. Every order is seeded by `(seed, epoch)`, so a resumed run sees the
//! same batches.

use super::job::JobConfig;
use crate::error::Result;
use lora_data::caption::CaptionProcessing;
use lora_data::loader::{
    batch_groups, derived_rng, epoch_rng, plan_epoch, plan_items, ItemGroups, PlannedBatch,
};
use lora_data::masks::MaskSource;
use lora_data::{ImageEntry, PlanConfig, ScanOptions, Severity};
use rand::Rng;
use std::path::PathBuf;
use std::sync::Arc;

/// One item of a planned batch: which image, from which dataset.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub image: usize,
    pub dataset: usize,
}

/// A planned batch and the dataset of each of its items.
pub(crate) type Batch = (PlannedBatch, Vec<Sample>);

/// How many usable images one `[[datasets]]` folder gave.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSummary {
    /// The folder.
    pub folder: PathBuf,
    /// Images that will be trained on.
    pub usable: usize,
    /// Image files found.
    pub files: usize,
    /// Regularisation images (`is_reg`).
    pub is_reg: bool,
    /// Its samples per epoch: images × repeats × resolutions (for a
    /// regularisation dataset after kohya's balance with the train images).
    pub samples_per_epoch: u64,
}

/// Everything the loop needs about the data.
pub(crate) struct Data {
    /// Shared with the prefetch thread.
    pub images: Arc<Vec<ImageEntry>>,
    pub dataset_of: Vec<usize>,
    pub plans: Vec<PlanConfig>,
    pub captions: Vec<CaptionProcessing>,
    pub summaries: Vec<DatasetSummary>,
    /// Per dataset: regularisation images (`is_reg`).
    pub is_reg: Vec<bool>,
    /// Regularisation images × their repeats as scanned (kohya's
    /// `num_reg_images`, before the balance).
    pub reg_images: u64,
}

impl Data {
    /// Scans every `[[datasets]]` folder of the job; files that cannot be
    /// used are skipped with a warning naming them. Epochs are planned in
    /// batches of `batch_size × world` items (the global batch of a
    /// data-parallel run of `world` ranks).
    pub fn scan(job: &JobConfig, world: usize) -> Result<Self> {
        let mut data = Data {
            images: Arc::new(Vec::new()),
            dataset_of: Vec::new(),
            plans: Vec::new(),
            captions: Vec::new(),
            summaries: Vec::new(),
            is_reg: job.datasets.iter().map(|d| d.is_reg).collect(),
            reg_images: 0,
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
            .map_err(|e| crate::SdxlError::train(e.to_string()))?;
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
                is_reg: ds.is_reg,
                samples_per_epoch: 0,
            });
            data.dataset_of
                .extend(std::iter::repeat_n(d, scan.images.len()));
            images.extend(scan.images);
            data.plans.push(PlanConfig {
                resolutions: ds.resolution.clone(),
                batch_size: job.train.batch_size * world,
                flip_x: ds.flip_x,
                random_crop: ds.random_crop,
                seed: job.job.seed,
            });
            data.captions.push(CaptionProcessing {
                // regularisation images show the class without the character
                trigger: job.job.trigger_word.clone().filter(|_| !ds.is_reg),
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
            return Err(crate::SdxlError::train(format!(
                "no usable image in {}: nothing to train on (run `lorakit dataset check` on the folder)",
                dirs.join(", ")
            )));
        }
        data.balance_reg(&mut images);
        data.images = Arc::new(images);
        for d in 0..data.summaries.len() {
            data.summaries[d].samples_per_epoch = data.dataset_samples(d);
        }
        Ok(data)
    }

    /// kohya's regularisation balance: reg images are registered in order
    /// with their repeats, then their repeats grow by one in turn, until the
    /// reg samples of an epoch reach the train samples; reg images not
    /// registered when that happens are not used (each sample here counts
    /// once per resolution of its dataset).
    fn balance_reg(&mut self, images: &mut Vec<ImageEntry>) {
        let samples =
            |d: usize, repeats: u32| u64::from(repeats) * self.plans[d].resolutions.len() as u64;
        let target: u64 = (0..images.len())
            .filter(|&i| !self.is_reg[self.dataset_of[i]])
            .map(|i| samples(self.dataset_of[i], images[i].repeats))
            .sum();
        let reg: Vec<usize> = (0..images.len())
            .filter(|&i| self.is_reg[self.dataset_of[i]])
            .collect();
        if reg.is_empty() {
            return;
        }
        self.reg_images = reg.iter().map(|&i| u64::from(images[i].repeats)).sum();
        let mut used = vec![false; images.len()];
        let (mut n, mut first) = (0u64, true);
        'fill: loop {
            for &i in &reg {
                let d = self.dataset_of[i];
                if first {
                    used[i] = true;
                    n += samples(d, images[i].repeats);
                } else {
                    images[i].repeats += 1;
                    n += samples(d, 1);
                }
                if n >= target {
                    break 'fill;
                }
            }
            first = false;
        }
        let unused = reg.iter().filter(|&&i| !used[i]).count();
        if unused > 0 {
            tracing::warn!("{unused} regularisation images are not used: as kohya does, an epoch takes as many reg samples as train samples ({target})");
        }
        let keep: Vec<bool> = (0..images.len())
            .map(|i| used[i] || !self.is_reg[self.dataset_of[i]])
            .collect();
        let mut k = keep.iter();
        images.retain(|_| *k.next().unwrap_or(&true));
        let mut k = keep.iter();
        self.dataset_of.retain(|_| *k.next().unwrap_or(&true));
        for (d, summary) in self.summaries.iter_mut().enumerate() {
            summary.usable = self.dataset_of.iter().filter(|&&x| x == d).count();
        }
    }

    /// The first dataset that is (`reg`) or is not regularisation.
    pub fn first_dataset(&self, reg: bool) -> Option<usize> {
        self.is_reg.iter().position(|&r| r == reg)
    }

    /// The images of dataset `d` (indices into `images`).
    fn indices_of(&self, d: usize) -> Vec<usize> {
        (0..self.images.len())
            .filter(|&i| self.dataset_of[i] == d)
            .collect()
    }

    /// The epoch's batches over every dataset: each dataset's items placed
    /// with its own plan, then pooled by (resolution, bucket) and batched
    /// together (as kohya's buckets mix subsets: regularisation images share
    /// batches with train images), train items first in each batch.
    pub fn epoch(&self, epoch: u64, seed: u64) -> Vec<Batch> {
        let mut pooled = ItemGroups::new();
        let mut rng0 = None;
        for (d, plan) in self.plans.iter().enumerate() {
            let idx = self.indices_of(d);
            let imgs: Vec<ImageEntry> = idx.iter().map(|&i| self.images[i].clone()).collect();
            let plan = PlanConfig {
                seed: plan.seed.wrapping_add(d as u64),
                ..plan.clone()
            };
            let mut rng = epoch_rng(&plan, epoch);
            for (key, items) in plan_items(&imgs, &plan, &mut rng) {
                let all = pooled.entry(key).or_default();
                all.extend(items.into_iter().map(|mut it| {
                    it.image = idx[it.image];
                    it
                }));
            }
            rng0.get_or_insert(rng);
        }
        let Some(mut rng) = rng0 else {
            return Vec::new();
        };
        // with one dataset this is exactly plan_epoch's order
        let batches = batch_groups(pooled, self.plans[0].batch_size, &mut rng);
        let mut all: Vec<Batch> = batches
            .into_iter()
            .map(|mut b| {
                let reg =
                    |it: &lora_data::loader::PlannedItem| self.is_reg[self.dataset_of[it.image]];
                b.items.sort_by_key(reg);
                let samples = (b.items.iter())
                    .map(|it| Sample {
                        image: it.image,
                        dataset: self.dataset_of[it.image],
                    })
                    .collect();
                (b, samples)
            })
            .collect();
        let mut rng = derived_rng(seed, &[2, epoch]);
        for i in (1..all.len()).rev() {
            let j = rng.gen_range(0..=i);
            all.swap(i, j);
        }
        all
    }

    /// Regularisation samples of a batch (they come last).
    pub fn reg_count(&self, samples: &[Sample]) -> usize {
        samples.iter().filter(|s| self.is_reg[s.dataset]).count()
    }

    /// Samples per epoch: images × repeats × resolutions.
    pub fn samples_per_epoch(&self) -> u64 {
        (0..self.plans.len()).map(|d| self.dataset_samples(d)).sum()
    }

    /// Samples per epoch of dataset `d`.
    fn dataset_samples(&self, d: usize) -> u64 {
        let reps: u64 = (self.indices_of(d).iter())
            .map(|&i| u64::from(self.images[i].repeats))
            .sum();
        reps * self.plans[d].resolutions.len() as u64
    }

    /// The fixed validation set of dataset `d`: its first `n` distinct
    /// images in its epoch-0 plan, centre-cropped, unflipped, one per batch.
    pub fn validation_set(&self, n: usize, d: usize) -> Vec<Batch> {
        let plan = PlanConfig {
            flip_x: false,
            random_crop: false,
            batch_size: 1,
            ..self.plans[d].clone()
        };
        let idx = self.indices_of(d);
        let imgs: Vec<ImageEntry> = idx.iter().map(|&i| self.images[i].clone()).collect();
        let mut seen = std::collections::BTreeSet::new();
        let mut v = Vec::new();
        for mut b in plan_epoch(&imgs, &plan, 0) {
            if v.len() >= n {
                break;
            }
            b.items[0].image = idx[b.items[0].image];
            let image = b.items[0].image;
            if seen.insert(image) {
                v.push((b, vec![Sample { image, dataset: d }]));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::job::DatasetSection;

    fn job(root: &std::path::Path, train: usize, reg: usize) -> JobConfig {
        let folder = |name: &str, n: usize| {
            let dir = root.join(name);
            lora_data::synthetic::write_character_dataset(&dir, n, 64, 64, "myaku", n as u64)
                .unwrap();
            DatasetSection {
                folder_path: dir,
                resolution: vec![64],
                ..Default::default()
            }
        };
        let mut c = JobConfig::default();
        c.job.trigger_word = Some("myaku".into());
        c.train.batch_size = 3;
        c.datasets = vec![
            folder(&format!("train{train}"), train),
            DatasetSection {
                is_reg: true,
                ..folder(&format!("reg{reg}"), reg)
            },
        ];
        c
    }

    /// kohya's `DreamBoothDataset` loop, written out: 5 train samples and
    /// 2 reg images of 1 repeat register 1 + 1, then grow to 3 + 2 = 5;
    /// 5 train samples and 7 reg images register the first 5 only.
    #[test]
    fn regularisation_images_are_balanced_mixed_and_untriggered() {
        let dir = tempfile::tempdir().unwrap();
        let data = Data::scan(&job(dir.path(), 5, 2), 1).unwrap();
        let reg_repeats: Vec<u32> = (0..data.images.len())
            .filter(|&i| data.is_reg[data.dataset_of[i]])
            .map(|i| data.images[i].repeats)
            .collect();
        assert_eq!(reg_repeats, [3, 2]);
        assert_eq!(data.samples_per_epoch(), 10);
        assert_eq!(data.reg_images, 2);
        assert_eq!(data.captions[0].trigger.as_deref(), Some("myaku"));
        assert_eq!(
            data.captions[1].trigger, None,
            "reg captions get no trigger"
        );

        let batches = data.epoch(0, 1);
        let samples: Vec<&Sample> = batches.iter().flat_map(|(_, s)| s).collect();
        assert_eq!(samples.len(), 10);
        assert_eq!(samples.iter().filter(|s| data.is_reg[s.dataset]).count(), 5);
        assert!(
            batches.iter().any(|(_, s)| {
                let reg = data.reg_count(s);
                reg > 0 && reg < s.len()
            }),
            "reg and train samples share batches"
        );
        for (_, s) in &batches {
            let reg = data.reg_count(s);
            assert!(
                s[s.len() - reg..].iter().all(|x| data.is_reg[x.dataset]),
                "reg last"
            );
        }

        let data = Data::scan(&job(dir.path(), 5, 7), 1).unwrap();
        assert_eq!(data.summaries[1].usable, 5, "two reg images left unused");
        assert_eq!(data.summaries[1].samples_per_epoch, 5);
        assert_eq!(data.reg_images, 7);
    }
}
