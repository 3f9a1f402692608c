//! A data-parallel run inside the trainer (the collectives are in
//! [`crate::dist`]). Every rank plans the same epoch with the *global*
//! batch (`batch_size × world`) and takes its slice of each one; the random
//! draws of a step (caption shuffles, latent samples, timesteps, noise) are
//! made for the whole global batch on every rank and sliced the same way.
//! So N ranks × batch b train exactly what one process × batch N·b trains,
//! up to the order of the gradient sum. Only rank 0 writes files.

use super::data::{Batch, Sample};
use crate::dist::{GradBuckets, ProcessGroup};
use crate::error::Result;
use lora_data::loader::PlannedBatch;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Gradient bucket size, as torch DDP's default `bucket_cap_mb = 25`.
const BUCKET_BYTES: usize = 25 << 20;

/// Which part of each global batch this process trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// One process: the whole batch.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's rows `[start, end)` of a global batch of `n` items: the
    /// ranks' slices are contiguous, in rank order, as even as `n` allows.
    pub fn range(&self, n: usize) -> (usize, usize) {
        (self.rank * n / self.world, (self.rank + 1) * n / self.world)
    }

    /// Rank 0, the one that validates and writes files.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// This rank's slice of a global batch.
    pub fn local(&self, planned: &PlannedBatch, samples: &[Sample]) -> Batch {
        let (lo, hi) = self.range(samples.len());
        (
            PlannedBatch {
                bucket: planned.bucket,
                items: planned.items[lo..hi].to_vec(),
            },
            samples[lo..hi].to_vec(),
        )
    }

    /// The factor on this rank's mean loss (over its `local` rows of `n`)
    /// that makes the mean over the ranks the global batch's mean loss
    /// (1 when the slices are even).
    pub fn loss_factor(&self, local: usize, n: usize) -> f64 {
        (local * self.world) as f64 / n as f64
    }
}

/// The run note of a data-parallel rank: who it is and the batch sizes.
pub(crate) fn note(job: &super::job::JobConfig, pg: &ProcessGroup) -> String {
    let train = &job.train;
    let global = train.batch_size * pg.world();
    format!(
        "data-parallel: rank {} of {} (c10d Gloo); each global batch of {global} = train.batch_size {} × {} ranks is split between the ranks, effective batch {} with train.gradient_accumulation {}; rank 0 writes the files",
        pg.rank(),
        pg.world(),
        train.batch_size,
        pg.world(),
        global * train.gradient_accumulation,
        train.gradient_accumulation,
    )
}

/// What a resume says when the saved run planned its epochs with another
/// global batch (`batch_size × ranks`): the position is kept as a count of
/// batches, so the rest of that epoch is not the one the saved run had.
pub(crate) fn resume_note(
    saved: Option<super::state::Position>,
    global_batch: u64,
) -> Option<String> {
    let saved = saved?;
    (saved.global_batch != 0 && saved.global_batch != global_batch).then(|| {
        format!(
            "--resume: the saved run had {} items per batch over all ranks and this one has {global_batch} (train.batch_size × ranks): training continues from step {}, but epoch {} is planned anew and its first {} batches are skipped, so some images of it are seen twice or not at all. Keep batch_size × ranks equal to continue exactly",
            saved.global_batch, saved.step, saved.epoch, saved.batch
        )
    })
}

/// Rows `[start, start + len)` of a draw made for the whole batch.
pub(crate) fn rows(global: Tensor, (start, len): (usize, usize)) -> Tensor {
    if start == 0 && global.size()[0] == len as i64 {
        return global;
    }
    global.narrow(0, start as i64, len as i64)
}

/// The collectives of one data-parallel run.
pub(crate) struct DistRun {
    pub pg: Arc<ProcessGroup>,
    buckets: GradBuckets,
    /// A CPU flag for agreeing on a stop (Gloo reduces it on the host, so it
    /// never synchronises a GPU).
    flag: Tensor,
}

impl DistRun {
    /// Buckets for `params`' gradients; makes every rank start from rank
    /// 0's `params` and checks that all ranks stand at the same `step`
    /// (a resumed rank that could not read the run's state would not).
    pub fn new(pg: Arc<ProcessGroup>, params: &[Tensor], step: u64) -> Result<Self> {
        let buckets = pg.buckets(params, BUCKET_BYTES)?;
        pg.broadcast(params, 0)?;
        let steps = Tensor::from_slice(&[step as i64, -(step as i64)]);
        pg.all_reduce_max(&steps)?;
        let (hi, lo) = (steps.int64_value(&[0]), -steps.int64_value(&[1]));
        if hi != lo {
            return Err(crate::SdxlError::Dist {
                rank: pg.rank(),
                world: pg.world(),
                reason: format!(
                    "the ranks start at different steps ({lo} … {hi}): every rank must read the same state.safetensors (on several machines, put output_dir on a shared filesystem)"
                ),
            });
        }
        Ok(Self {
            pg,
            buckets,
            flag: Tensor::zeros([1], (Kind::Int64, Device::Cpu)),
        })
    }

    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.pg.rank(),
            world: self.pg.world(),
        }
    }

    /// Averages the gradients over the ranks (before clipping and the update).
    pub fn average_gradients(&self) -> Result<()> {
        self.pg.average_gradients(&self.buckets)
    }

    /// Whether any rank wants to stop after this step (Ctrl-C reaches the
    /// ranks at slightly different moments; they must stop at the same one).
    pub fn any_stop(&mut self, mine: bool) -> Result<bool> {
        let _ = self.flag.fill_(i64::from(mine));
        self.pg.all_reduce_max(&self.flag)?;
        Ok(self.flag.int64_value(&[0]) != 0)
    }

    /// The mean over the ranks of `t` (a loss sum), in place.
    pub fn mean(&self, t: &Tensor) -> Result<()> {
        self.pg.all_reduce_sum(t)?;
        let _ = t.shallow_clone().g_div_scalar_(self.pg.world() as f64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::state::Position;

    #[test]
    fn a_resume_with_another_global_batch_says_what_changes() {
        let saved = Position {
            step: 120,
            epoch: 3,
            batch: 5,
            global_batch: 4,
        };
        // 2 ranks × 2 resumed as 1 × 4, or a fresh run: nothing to say
        assert_eq!(resume_note(Some(saved), 4), None);
        assert_eq!(resume_note(None, 8), None);
        // a state written before the global batch was recorded
        let old = Position {
            global_batch: 0,
            ..saved
        };
        assert_eq!(resume_note(Some(old), 8), None);
        let note = resume_note(Some(saved), 8).unwrap();
        for part in [
            "had 4 items",
            "this one has 8",
            "step 120",
            "epoch 3",
            "first 5 batches",
        ] {
            assert!(note.contains(part), "{part}: {note}");
        }
    }

    /// Pure-Rust f64 sums grouped two ways (IEEE 754, no contraction: the
    /// same on every x86-64 CPU): a few f64 ulps of a mean below 4; 4.4e-16
    /// measured. The old bound 1e-12 is kept (margin 280); a rank counted
    /// twice or a wrong factor is off by ≥ 0.1.
    const MEAN: lora_testkit::Tolerance = lora_testkit::Tolerance::new(
        4.0 * f64::EPSILON * 4.0,
        280.0,
        "f64 rounding of a mean below 4",
    );

    #[test]
    fn slices_cover_the_global_batch_in_rank_order() {
        for world in 1..=4 {
            for n in 0..=9 {
                let ranges: Vec<_> = (0..world)
                    .map(|rank| Shard { rank, world }.range(n))
                    .collect();
                assert_eq!(ranges[0].0, 0);
                assert_eq!(ranges[world - 1].1, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].1, w[1].0, "contiguous");
                }
                let sizes: Vec<usize> = ranges.iter().map(|(a, b)| b - a).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "even: {sizes:?}");
                // the mean over the ranks of (local mean × factor) is the
                // global batch's mean; a rank with no rows adds 0
                let losses: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 * 0.37).collect();
                let scaled: f64 = (ranges.iter().enumerate())
                    .filter(|(_, (a, b))| b > a)
                    .map(|(rank, &(a, b))| {
                        let mean = losses[a..b].iter().sum::<f64>() / (b - a) as f64;
                        mean * Shard { rank, world }.loss_factor(b - a, n)
                    })
                    .sum();
                if n > 0 {
                    let global = losses.iter().sum::<f64>() / n as f64;
                    MEAN.check(
                        format!("{world} ranks, {n} rows: mean of the rank means"),
                        (scaled / world as f64 - global).abs(),
                    );
                }
            }
        }
    }
}
