//! A step's inputs: latents of a planned batch (VAE moments from the
//! content-keyed latent cache, or decoded and encoded now, the next batch's
//! images decoded on a background thread meanwhile) and its text and size
//! conditioning (optionally from the in-memory text-embedding cache).

use super::data::{Batch, Data, Sample};
use super::job::JobConfig;
use super::plan::Plan;
use super::schedule::latent_mask;
use super::schedule::ScheduleTables;
use super::shard::rows;
use crate::error::Result;
use crate::model::captions::encode_captions;
use crate::model::conditioning::{time_ids, TextConditioning};
use crate::model::sdxl::SdxlModel;
use crate::model::tokenizer::ClipTokenizer;
use lora_data::image_io::DecodeLimits;
use lora_data::loader::{load_batch, LoadedBatch, PlannedBatch};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// Batches decoded ahead of the step that uses them.
pub const PREFETCH_DEPTH: usize = 2;

/// How a run's batches were decoded (latents not taken from the cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Batches decoded on the training thread, the step waiting.
    pub in_step: u64,
    /// Batches decoded on a background thread while an earlier step ran,
    /// then used.
    pub ahead: u64,
    /// Background decodes never used (the plan moved on); 0 in a normal run.
    pub wasted: u64,
}

/// One image's VAE encoding as the latent cache keeps it.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// Mean and log-variance, `[8, h, w]`.
    pub moments: Tensor,
    /// Its loss mask on the latent grid, `[1, h, w]`.
    pub mask: Option<Tensor>,
}

impl Clone for Encoded {
    fn clone(&self) -> Self {
        Self {
            moments: self.moments.shallow_clone(),
            mask: self.mask.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// What a step reads: the job and its plan, the model, the data and the
/// caches. Defined here, beside its input methods (latents, conditioning,
/// prefetch); `step.rs` adds the step itself. Built by `Run::prepare`.
pub(crate) struct Env {
    pub job: JobConfig,
    /// Every named choice of `job`, typed.
    pub plan: Plan,
    pub job_path: PathBuf,
    pub run_dir: PathBuf,
    pub model: SdxlModel,
    pub tok: ClipTokenizer,
    pub tables: ScheduleTables,
    pub timesteps: crate::train::timesteps::TimestepSampler,
    pub v_pred: bool,
    pub data: Data,
    pub inputs: Inputs,
    /// This process's part of each batch (the whole batch outside a
    /// data-parallel run).
    pub shard: super::shard::Shard,
}

/// The caches a run keeps between steps.
#[derive(Default)]
pub(crate) struct Inputs {
    /// On-disk latent cache (`cache_latents`).
    pub cache: Option<lora_data::TensorCache>,
    /// Encodings already read or computed this run (by cache key).
    pub memory: RefCell<HashMap<String, Encoded>>,
    /// Upcoming batches' pixels, decoded on background threads while the
    /// current step runs (only batches whose latents are not cached), oldest
    /// first, at most [`PREFETCH_DEPTH`].
    pub prefetched: RefCell<VecDeque<(PlannedBatch, JoinHandle<LoadedBatch>)>>,
    /// How batches were decoded.
    pub stats: Cell<DecodeStats>,
    /// `cache_text_embeddings`: (context, pooled) per caption, computed once.
    pub text_memory: RefCell<HashMap<String, (Tensor, Tensor)>>,
    /// Identity of the VAE in latent cache keys.
    pub vae_id: String,
    /// SDXL size conditioning on the device.
    pub time_ids: TimeIdsMemo,
}

/// SDXL size conditioning (`time_ids`) on the device, one tensor per
/// distinct (original size, crop, target size): made once, so a step copies
/// nothing from the host (a pageable copy makes the host wait for CUDA).
#[derive(Default)]
pub(crate) struct TimeIdsMemo(RefCell<HashMap<[u32; 6], Tensor>>);

impl TimeIdsMemo {
    /// The `[1, 6]` time ids of `c` on `device`.
    pub fn get(&self, c: &lora_data::SizeConditioning, device: Device) -> Tensor {
        let (o, k, t) = (c.original_hw, c.crop_top_left, c.target_hw);
        self.0
            .borrow_mut()
            .entry([o.0, o.1, k.0, k.1, t.0, t.1])
            .or_insert_with(|| time_ids(o, k, t, device))
            .shallow_clone()
    }
}

impl Inputs {
    /// The caches of a run of `model_path` whose files live in `run_dir`: the
    /// latent cache under the run's output (never in the dataset), keyed by
    /// image content, bucket, crop, flip and the VAE's identity (model file
    /// name, size, mtime, and the dtype it encodes in: fp16 and fp32 latents
    /// differ).
    pub fn new(model_path: &Path, vae_kind: Kind, run_dir: &Path, cache_latents: bool) -> Self {
        let m = std::fs::metadata(model_path).ok();
        let mtime = m
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let vae_id = format!(
            "{}:{}:{mtime}:{vae_kind:?}",
            model_path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            m.as_ref().map(|m| m.len()).unwrap_or(0)
        );
        Self {
            cache: cache_latents
                .then(|| lora_data::TensorCache::new(run_dir.join("cache").join("latents"))),
            vae_id,
            ..Default::default()
        }
    }
}

/// Decodes a planned batch's images (white behind transparency, the
/// default size limits), on whichever thread calls it.
fn decode(images: &[lora_data::ImageEntry], planned: &PlannedBatch) -> LoadedBatch {
    load_batch(
        images,
        planned,
        0,
        &DecodeLimits::default(),
        [255, 255, 255],
    )
}

impl Env {
    /// Whether a batch's latents may be cached: not when its dataset draws
    /// a random crop, which changes every epoch (kohya refuses to cache
    /// latents then; lorakit encodes those batches at every step, so the
    /// cache never grows with the epochs).
    pub fn cacheable(&self, samples: &[Sample]) -> bool {
        samples
            .iter()
            .all(|s| !self.data.plans[s.dataset].random_crop)
    }

    /// Cache keys of a batch's latents (`None` without `cache_latents`, or
    /// when the batch is not `cacheable`).
    fn latent_keys(&self, planned: &PlannedBatch, cacheable: bool) -> Option<Vec<String>> {
        let cache = self.inputs.cache.as_ref().filter(|_| cacheable);
        cache.map(|_| {
            planned
                .items
                .iter()
                .map(|it| {
                    lora_data::LatentKey {
                        image_hash: self.data.images[it.image].content_hash.clone(),
                        bucket: it.placement.bucket,
                        crop: it.placement.crop,
                        flip: it.flip,
                        vae_id: self.inputs.vae_id.clone(),
                        mask: self.data.images[it.image]
                            .mask
                            .as_ref()
                            .map(|m| m.cache_id()),
                    }
                    .canonical()
                })
                .collect()
        })
    }

    /// Starts decoding a batch on a background thread unless its latents
    /// are already cached (memory or disk) or it is already under way. The
    /// queue keeps the [`PREFETCH_DEPTH`] newest; an older entry the plan
    /// never asked for is dropped (counted as wasted).
    pub fn prefetch(&self, batch: &Batch) {
        // this rank's slice: the one `latents` will ask for
        let (planned, samples) = &self.shard.local(&batch.0, &batch.1);
        let keys = self.latent_keys(planned, self.cacheable(samples));
        if let (Some(c), Some(keys)) = (&self.inputs.cache, keys) {
            let memory = self.inputs.memory.borrow();
            if keys
                .iter()
                .all(|k| memory.contains_key(k) || c.path_for(k).exists())
            {
                return;
            }
        }
        let mut queue = self.inputs.prefetched.borrow_mut();
        if planned.items.is_empty() || queue.iter().any(|(p, _)| p == planned) {
            return;
        }
        let images = self.data.images.clone();
        let batch = planned.clone();
        let handle = std::thread::spawn(move || decode(&images, &batch));
        queue.push_back((planned.clone(), handle));
        while queue.len() > PREFETCH_DEPTH {
            queue.pop_front();
            self.count(|s| s.wasted += 1);
        }
    }

    fn count(&self, f: impl FnOnce(&mut DecodeStats)) {
        let mut s = self.inputs.stats.get();
        f(&mut s);
        self.inputs.stats.set(s);
    }

    /// One image's cached encoding: from memory, else from the disk cache
    /// (then kept in memory: after the first epoch no step re-reads the disk).
    fn cached_entry(&self, cache: &lora_data::TensorCache, key: &str) -> Option<Encoded> {
        if let Some(e) = self.inputs.memory.borrow().get(key) {
            return Some(e.clone());
        }
        let device = self.model.unet_device();
        let mut stored = cache.get(key)?;
        let e = Encoded {
            moments: stored.remove("moments")?.to_device(device),
            mask: stored.remove("mask").map(|m| m.to_device(device)),
        };
        self.inputs
            .memory
            .borrow_mut()
            .insert(key.to_string(), e.clone());
        Some(e)
    }

    /// Encodes a planned batch now (VAE moments, masks on the latent grid)
    /// and stores each image's encoding in the caches when they are on.
    fn encode_now(&self, planned: &PlannedBatch, keys: Option<&[String]>) -> Result<Vec<Encoded>> {
        let (pixels, masks) = self.pixels(planned)?;
        let (mean, logvar) = tch::no_grad(|| self.model.vae.encode_moments(&pixels));
        let m = Tensor::cat(&[mean.to_kind(Kind::Float), logvar.to_kind(Kind::Float)], 1);
        let s = m.size();
        let masks = masks.map(|x| latent_mask(&x, s[2], s[3]));
        let entries: Vec<Encoded> = (0..s[0])
            .map(|i| Encoded {
                moments: m.get(i),
                mask: masks.as_ref().map(|x| x.get(i)),
            })
            .collect();
        if let (Some(c), Some(keys)) = (&self.inputs.cache, keys) {
            for (e, k) in entries.iter().zip(keys) {
                let cpu = |t: &Tensor| t.to_device(Device::Cpu);
                let (moments, mask) = (cpu(&e.moments), e.mask.as_ref().map(cpu));
                let mut stored = vec![("moments", &moments)];
                stored.extend(mask.as_ref().map(|m| ("mask", m)));
                c.put(k, &stored)
                    .map_err(|e| crate::SdxlError::train(e.to_string()))?;
                self.inputs.memory.borrow_mut().insert(k.clone(), e.clone());
            }
        }
        Ok(entries)
    }

    /// Scaled latents of a planned batch and, when its images have loss
    /// masks, the masks on the latent grid `[B, 1, h, w]`: VAE moments (from
    /// the content-keyed cache when `cache_latents`, else encoded now), then
    /// a seeded sample.
    pub fn latents(
        &self,
        planned: &PlannedBatch,
        cacheable: bool,
        seed: u64,
        (start, global): (usize, usize),
    ) -> Result<(Tensor, Option<Tensor>)> {
        let keys = self.latent_keys(planned, cacheable);
        let device = self.model.unet_device();
        let cached: Option<Vec<Encoded>> = match (&self.inputs.cache, &keys) {
            (Some(c), Some(keys)) => keys.iter().map(|k| self.cached_entry(c, k)).collect(),
            _ => None,
        };
        let entries = match cached {
            Some(e) => e,
            None => self.encode_now(planned, keys.as_deref())?,
        };
        let moments: Vec<&Tensor> = entries.iter().map(|e| &e.moments).collect();
        let moments = Tensor::stack(&moments, 0).to_device(device);
        let mask = entries.iter().any(|e| e.mask.is_some()).then(|| {
            let m: Vec<Tensor> = entries
                .iter()
                .map(|e| match &e.mask {
                    Some(m) => m.shallow_clone(),
                    None => e.moments.ones_like().narrow(0, 0, 1),
                })
                .collect();
            Tensor::stack(&m, 0).to_device(device)
        });
        let z = tch::no_grad(|| {
            let parts = moments.chunk(2, 1);
            tch::manual_seed(seed as i64);
            // drawn for the whole global batch, as one process would (shard.rs)
            let mut shape = parts[0].size();
            let local = shape[0];
            shape[0] = global as i64;
            let eps = Tensor::randn(shape.as_slice(), (parts[0].kind(), parts[0].device()));
            let eps = rows(eps, (start, local as usize));
            let z = &parts[0] + (&parts[1] * 0.5).exp() * eps;
            z * self.model.vae.config.scaling_factor
        });
        Ok((z, mask))
    }

    /// Text and size conditioning `(context, y)` of a batch with
    /// `captions`: one per item, or a whole multiple of the items (output
    /// preservation's concatenated batch: the items' size conditioning is
    /// repeated in the same order).
    pub fn conditioning(
        &self,
        planned: &PlannedBatch,
        samples: &[Sample],
        captions: Vec<String>,
    ) -> Result<(Tensor, Tensor)> {
        let reps = captions.len() / planned.items.len().max(1);
        debug_assert_eq!(reps * planned.items.len(), captions.len());
        let device = self.model.unet_device();
        let train_te = self.job.train.train_text_encoder;
        let max_tokens = self.job.train.max_token_length;
        let enc = || {
            encode_captions(
                &self.tok,
                &self.model.te1,
                &self.model.te2,
                &captions,
                max_tokens,
            )
        };
        let cond = if self.job.train.cache_text_embeddings && !train_te {
            self.cached_text(&captions)?
        } else if train_te {
            enc()?
        } else {
            tch::no_grad(enc)?
        };
        let ids: Vec<Tensor> = planned
            .items
            .iter()
            .zip(samples)
            .map(|(it, s)| {
                let img = &self.data.images[s.image];
                let c =
                    lora_data::SizeConditioning::new(img.width, img.height, &it.placement, it.flip);
                self.inputs.time_ids.get(&c, device)
            })
            .collect();
        let ids = match Tensor::cat(&ids, 0) {
            ids if reps > 1 => ids.repeat([reps as i64, 1]),
            ids => ids,
        };
        let y = crate::model::unet::vector_conditioning(&cond.pooled, &ids);
        Ok((cond.context, y))
    }

    /// Text conditioning from the in-memory cache (`cache_text_embeddings`):
    /// each caption is encoded alone once. Every caption has the same
    /// length (`max_token_length`), so the batch is a plain concatenation and
    /// equals what encoding the batch at once gives.
    fn cached_text(&self, captions: &[String]) -> Result<TextConditioning> {
        let max_tokens = self.job.train.max_token_length;
        let mut memory = self.inputs.text_memory.borrow_mut();
        for c in captions {
            if !memory.contains_key(c) {
                let e = tch::no_grad(|| {
                    encode_captions(
                        &self.tok,
                        &self.model.te1,
                        &self.model.te2,
                        std::slice::from_ref(c),
                        max_tokens,
                    )
                })?;
                memory.insert(c.clone(), (e.context, e.pooled));
            }
        }
        let (ctx, pooled): (Vec<Tensor>, Vec<Tensor>) = captions
            .iter()
            .map(|c| {
                let (x, p) = &memory[c];
                (x.shallow_clone(), p.shallow_clone())
            })
            .unzip();
        Ok(TextConditioning {
            context: Tensor::cat(&ctx, 0),
            pooled: Tensor::cat(&pooled, 0),
        })
    }

    /// Loads a planned batch's pixels as a `[B, 3, H, W]` tensor, and its
    /// loss masks as `[B, 1, H, W]` when it has any.
    fn pixels(&self, planned: &PlannedBatch) -> Result<(Tensor, Option<Tensor>)> {
        let ready = {
            let mut queue = self.inputs.prefetched.borrow_mut();
            let at = queue.iter().position(|(p, _)| p == planned);
            at.and_then(|i| queue.remove(i))
                .and_then(|(_, h)| h.join().ok())
        };
        let lb = match ready {
            Some(lb) => {
                self.count(|s| s.ahead += 1);
                lb
            }
            None => {
                self.count(|s| s.in_step += 1);
                decode(&self.data.images, planned)
            }
        };
        if !lb.skipped.is_empty() || lb.items.is_empty() {
            return Err(crate::SdxlError::train(format!(
                "could not read {}: the dataset changed during training",
                lb.skipped.join(", ")
            )));
        }
        let (w, h) = planned.bucket;
        let (b, device) = (lb.items.len() as i64, self.model.unet_device());
        let pixels = crate::device::upload(
            Tensor::from_slice(&lb.pixels).view([b, 3, h as i64, w as i64]),
            device,
        );
        let masks = lb.masks.map(|m| {
            crate::device::upload(
                Tensor::from_slice(&m).view([b, 1, h as i64, w as i64]),
                device,
            )
        });
        Ok((pixels, masks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_are_made_once_per_distinct_conditioning() {
        let memo = TimeIdsMemo::default();
        let c = |crop: (u32, u32)| lora_data::SizeConditioning {
            original_hw: (768, 1024),
            crop_top_left: crop,
            target_hw: (512, 640),
        };
        let a = memo.get(&c((0, 16)), Device::Cpu);
        let want = Tensor::from_slice(&[768f32, 1024., 0., 16., 512., 640.]).view([1, 6]);
        assert!(a.equal(&want));
        // the same conditioning is the same tensor, not a new copy
        assert_eq!(memo.get(&c((0, 16)), Device::Cpu).data_ptr(), a.data_ptr());
        // another crop of the same image is its own
        let b = memo.get(&c((8, 0)), Device::Cpu);
        assert!(b.equal(&Tensor::from_slice(&[768f32, 1024., 8., 0., 512., 640.]).view([1, 6])));
    }
}
