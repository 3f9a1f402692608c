//! Epoch planning and the parallel, prefetching batch loader.
//!
//! An epoch holds every image × its repeats × every resolution. Items are
//! grouped by (resolution, bucket), each group is shuffled and cut into
//! batches (a batch never mixes buckets; a group's last batch may be short),
//! and the batch order is shuffled. Everything random (order, random crop
//! position, flip) is drawn from a generator seeded by `(seed, epoch)`, so
//! an epoch's plan is a pure function of them: resuming at `(epoch, batch)`
//! replays the same data exactly.
//!
//! [`Loader`] decodes, resizes and crops a batch's images in parallel (rayon)
//! on a background thread and keeps at most `prefetch` batches ready, so
//! memory stays bounded while the trainer works.

use crate::buckets::{assign, Bucket, BucketSpec, CropMode, Placement, SizeConditioning};
use crate::error::Result;
use crate::image_io::{decode, resize_crop, to_chw_f32, to_rgb, DecodeLimits};
use crate::scan::ImageEntry;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A generator for one purpose, derived from a seed and indices (splitmix-mixed).
pub fn derived_rng(seed: u64, parts: &[u64]) -> ChaCha8Rng {
    let mut z = seed ^ 0x6C6F_7261_6B69_7400; // "lorakit"
    for &p in parts {
        z = z.wrapping_add(p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    ChaCha8Rng::seed_from_u64(z)
}

/// How an epoch is built.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanConfig {
    /// Training resolutions (each has its own bucket set).
    pub resolutions: Vec<u32>,
    /// Images per batch.
    pub batch_size: usize,
    /// Mirror each sample with probability 0.5.
    pub flip_x: bool,
    /// Random instead of centre crop.
    pub random_crop: bool,
    /// Seed of the run.
    pub seed: u64,
}

/// One sample of a planned batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedItem {
    /// Index into the image list.
    pub image: usize,
    /// Resolution set it belongs to.
    pub resolution: u32,
    /// Bucket and crop.
    pub placement: Placement,
    /// Mirrored.
    pub flip: bool,
}

/// A planned batch: samples of one bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedBatch {
    /// Shared bucket (w, h).
    pub bucket: Bucket,
    /// The samples.
    pub items: Vec<PlannedItem>,
}

/// Items per epoch: Σ repeats × resolutions.
pub fn epoch_len(images: &[ImageEntry], resolutions: usize) -> u64 {
    images.iter().map(|i| i.repeats as u64).sum::<u64>() * resolutions as u64
}

/// An epoch's items before batching, by (resolution, bucket).
pub type ItemGroups = BTreeMap<(u32, Bucket), Vec<PlannedItem>>;

/// Plans epoch `epoch` (0-based) deterministically.
pub fn plan_epoch(images: &[ImageEntry], cfg: &PlanConfig, epoch: u64) -> Vec<PlannedBatch> {
    let mut rng = epoch_rng(cfg, epoch);
    let groups = plan_items(images, cfg, &mut rng);
    batch_groups(groups, cfg.batch_size, &mut rng)
}

/// The generator of epoch `epoch` of a plan (for [`plan_items`] and then
/// [`batch_groups`], in that order).
pub fn epoch_rng(cfg: &PlanConfig, epoch: u64) -> ChaCha8Rng {
    derived_rng(cfg.seed, &[1, epoch])
}

/// Every image × repeats × resolution placed in its bucket (crop and flip
/// drawn from `rng`), grouped by (resolution, bucket).
pub fn plan_items(images: &[ImageEntry], cfg: &PlanConfig, rng: &mut ChaCha8Rng) -> ItemGroups {
    let mode = if cfg.random_crop {
        CropMode::Random
    } else {
        CropMode::Centre
    };
    let mut groups = ItemGroups::new();
    for &res in &cfg.resolutions {
        let buckets = BucketSpec::for_resolution(res).buckets();
        for (i, img) in images.iter().enumerate() {
            for _ in 0..img.repeats.max(1) {
                let Some(placement) = assign(&buckets, img.width, img.height, mode, rng) else {
                    continue;
                };
                let flip = cfg.flip_x && rng.gen::<bool>();
                groups
                    .entry((res, placement.bucket))
                    .or_default()
                    .push(PlannedItem {
                        image: i,
                        resolution: res,
                        placement,
                        flip,
                    });
            }
        }
    }
    groups
}

/// Batches of `batch_size` from each group (a batch never mixes buckets; a
/// group's last batch may be short), groups shuffled inside, batch order
/// shuffled.
pub fn batch_groups(
    groups: ItemGroups,
    batch_size: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<PlannedBatch> {
    let bs = batch_size.max(1);
    let mut batches = Vec::new();
    for ((_, bucket), mut items) in groups {
        items.shuffle(rng);
        for chunk in items.chunks(bs) {
            batches.push(PlannedBatch {
                bucket,
                items: chunk.to_vec(),
            });
        }
    }
    batches.shuffle(rng);
    batches
}

/// A sample ready for the VAE.
#[derive(Debug, Clone)]
pub struct LoadedItem {
    /// Index into the image list.
    pub image: usize,
    /// SDXL size/crop conditioning.
    pub conditioning: SizeConditioning,
    /// Mirrored.
    pub flip: bool,
    /// The plan entry.
    pub planned: PlannedItem,
}

/// A batch ready for the VAE: `pixels` is `[B, 3, H, W]` in `[-1, 1]`, row-major.
#[derive(Debug, Clone)]
pub struct LoadedBatch {
    /// Position of the batch in its epoch.
    pub index: usize,
    /// Bucket (w, h).
    pub bucket: Bucket,
    /// Pixels, `B·3·H·W` floats.
    pub pixels: Vec<f32>,
    /// Loss masks, `B·H·W` weights in `[0, 1]`, when any image of the batch
    /// has one ([`crate::masks`]; an image without one weighs 1 everywhere).
    pub masks: Option<Vec<f32>>,
    /// Per-sample data, in the order of `pixels`.
    pub items: Vec<LoadedItem>,
    /// Images that failed to load (skipped, each logged with its file name).
    pub skipped: Vec<String>,
}

/// One planned item's pixels (`3·H·W`) and, when the image has one, its
/// loss mask (`H·W`), cropped and flipped alike.
pub fn load_item(
    img: &ImageEntry,
    item: &PlannedItem,
    limits: &DecodeLimits,
    background: [u8; 3],
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let bytes = std::fs::read(&img.path).map_err(|e| crate::error::DataError::io(&img.path, e))?;
    let decoded = decode(&img.path, &bytes, limits)?;
    let mask = match &img.mask {
        Some(m) => Some(crate::masks::load_mask(
            (&img.path, (img.width, img.height)),
            m,
            &decoded,
            (&item.placement, item.flip),
            limits,
        )?),
        None => None,
    };
    let out = resize_crop(&to_rgb(decoded, background), &item.placement, item.flip)?;
    Ok((to_chw_f32(&out), mask))
}

/// Loads a planned batch, decoding its images in parallel.
pub fn load_batch(
    images: &[ImageEntry],
    batch: &PlannedBatch,
    index: usize,
    limits: &DecodeLimits,
    background: [u8; 3],
) -> LoadedBatch {
    let results: Vec<_> = batch
        .items
        .par_iter()
        .map(|it| {
            (
                it.clone(),
                load_item(&images[it.image], it, limits, background),
            )
        })
        .collect();
    let (w, h) = batch.bucket;
    let plane = (w * h) as usize;
    let mut pixels = Vec::with_capacity(results.len() * 3 * plane);
    let mut masks: Vec<Option<Vec<f32>>> = Vec::new();
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for (it, r) in results {
        let img = &images[it.image];
        match r {
            Ok((px, mask)) => {
                pixels.extend_from_slice(&px);
                masks.push(mask);
                items.push(LoadedItem {
                    image: it.image,
                    conditioning: SizeConditioning::new(
                        img.width,
                        img.height,
                        &it.placement,
                        it.flip,
                    ),
                    flip: it.flip,
                    planned: it,
                });
            }
            Err(e) => {
                tracing::warn!("skipping {}: {e}", img.rel);
                skipped.push(img.rel.clone());
            }
        }
    }
    let masks = masks.iter().any(Option::is_some).then(|| {
        masks
            .into_iter()
            .flat_map(|m| m.unwrap_or_else(|| vec![1.0; plane]))
            .collect()
    });
    LoadedBatch {
        index,
        bucket: batch.bucket,
        pixels,
        masks,
        items,
        skipped,
    }
}

/// Streams the batches of a plan from a background thread, `prefetch` ahead.
pub struct Loader {
    rx: Receiver<LoadedBatch>,
    handle: Option<JoinHandle<()>>,
}

impl Loader {
    /// Starts loading `plan[start..]`.
    pub fn start(
        images: Arc<Vec<ImageEntry>>,
        plan: Vec<PlannedBatch>,
        start: usize,
        prefetch: usize,
        limits: DecodeLimits,
        background: [u8; 3],
    ) -> Self {
        let (tx, rx) = sync_channel(prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("lorakit-loader".into())
            .spawn(move || {
                for (i, b) in plan.iter().enumerate().skip(start) {
                    let loaded = load_batch(&images, b, i, &limits, background);
                    if tx.send(loaded).is_err() {
                        break; // consumer gone
                    }
                }
            })
            .expect("spawning the loader thread");
        Self {
            rx,
            handle: Some(handle),
        }
    }
}

impl Iterator for Loader {
    type Item = LoadedBatch;
    fn next(&mut self) -> Option<LoadedBatch> {
        self.rx.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Unblock the producer: dropping the receiver makes `send` fail.
        let (_, dummy) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, dummy));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
