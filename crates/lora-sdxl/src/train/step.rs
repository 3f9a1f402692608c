//! One training step's objective — noise, timesteps, the ε or v target, the
//! loss and its min-SNR weighting — and the fixed-seed validation loss.

use super::data::{Batch, Sample};
use super::inputs::Env;
use super::noise::{input_noise, training_noise};
use super::plan::Loss;
use super::schedule::{batch_loss, per_sample_loss};
use super::shard::rows;
use crate::error::Result;
use lora_data::loader::{derived_rng, PlannedBatch};
use rand::Rng;
use tch::{Kind, Tensor};

/// One micro-step's draws for this rank's slice (see [`Env::draw`]).
pub(crate) struct Drawn {
    /// This rank's part of the batch.
    pub planned: PlannedBatch,
    /// Its samples.
    pub samples: Vec<Sample>,
    /// Their processed captions (trigger, dropouts, shuffle).
    pub captions: Vec<String>,
    /// `x₀` noised to `ts`.
    pub noisy: Tensor,
    /// The ε or v target.
    pub target: Tensor,
    /// Timesteps, `[B]` integers.
    pub ts: Tensor,
    /// Loss masks on the latent grid.
    pub mask: Option<Tensor>,
    /// The data-parallel loss factor of this slice (1 in one process).
    pub factor: f64,
}

/// A micro-step's loss (with gradients) and its output-preservation term.
pub(crate) struct StepLoss {
    /// The loss to backpropagate: the diffusion loss plus
    /// `multiplier × preservation`.
    pub loss: Tensor,
    /// `mse(LoRA(preserved captions), base(preserved captions))`, detached,
    /// before the multiplier (and the data-parallel factor); `None` without
    /// output preservation.
    pub preservation: Option<Tensor>,
}

impl Env {
    /// `x₀` noised to timesteps `ts` with `input` noise and the training
    /// target: the noise (ε) or the velocity (v-prediction) of `noise`
    /// (they differ with `ip_noise_gamma`).
    fn noised(&self, x0: &Tensor, input: &Tensor, noise: Tensor, ts: &Tensor) -> (Tensor, Tensor) {
        let noisy = self.tables.add_noise(x0, input, ts);
        let target = if self.v_pred {
            self.tables.v_target(x0, &noise, ts)
        } else {
            noise
        };
        (noisy, target)
    }

    /// This rank's slice of one global micro-batch drawn for micro-step
    /// `micro_id`: its captions (processed), noisy latents, timesteps and
    /// target; `None` when the slice is empty (a short last batch with more
    /// ranks than items). Every draw is made for the whole batch and sliced
    /// (see `shard`), so the ranks together train what one process would;
    /// the same `micro_id` draws the same again (a test's hand computation
    /// reads them).
    pub fn draw(
        &self,
        planned: &PlannedBatch,
        samples: &[Sample],
        micro_id: u64,
    ) -> Result<Option<Drawn>> {
        let train = &self.job.train;
        let seed = self.job.job.seed;
        let mut rng = derived_rng(seed, &[3, micro_id]);
        let mut captions: Vec<String> = planned
            .items
            .iter()
            .zip(samples)
            .map(|(_, s)| {
                self.data.captions[s.dataset].process(&self.data.images[s.image].caption, &mut rng)
            })
            .collect();
        let n = samples.len();
        let (lo, hi) = self.shard.range(n);
        let rows_of = (lo, hi - lo);
        let latent_seed = rng.gen();
        let step_seed: i64 = rng.gen::<i64>() & i64::MAX;
        if lo == hi {
            return Ok(None);
        }
        let (planned, samples) = self.shard.local(planned, samples);
        let captions: Vec<String> = captions.drain(lo..hi).collect();
        let (x0, mask) = self.latents(&planned, self.cacheable(&samples), latent_seed, (lo, n))?;
        tch::manual_seed(step_seed);
        let device = x0.device();
        let ts = rows(self.timesteps.sample(n as i64, device), rows_of);
        let mut global = x0.size();
        global[0] = n as i64;
        let template = if hi - lo == n {
            x0.shallow_clone()
        } else {
            Tensor::empty(global.as_slice(), (x0.kind(), device))
        };
        let noise = training_noise(train, &template, &mut rng);
        let input = rows(input_noise(train, &noise), rows_of);
        let noise = rows(noise, rows_of);
        let (noisy, target) = self.noised(&x0, &input, noise, &ts);
        Ok(Some(Drawn {
            planned,
            samples,
            captions,
            noisy,
            target,
            ts,
            mask,
            factor: self.shard.loss_factor(hi - lo, n),
        }))
    }

    /// Loss of this rank's slice of one global micro-batch (not yet divided
    /// by the accumulation) and its output-preservation term; `None` when
    /// the slice is empty. With preservation (see `preservation.rs`) the
    /// base model's prior runs first without gradients, then one forward
    /// over the batch concatenated with its preserved captions.
    pub fn micro_step(
        &self,
        planned: &PlannedBatch,
        samples: &[Sample],
        micro_id: u64,
    ) -> Result<Option<StepLoss>> {
        let train = &self.job.train;
        let Some(d) = self.draw(planned, samples, micro_id)? else {
            return Ok(None);
        };
        let b = d.samples.len() as i64;
        let preserved = self.plan.preservation.captions(&d.captions);
        let mut captions = d.captions.clone();
        captions.extend(preserved.iter().flatten().cloned());
        // one text encoding (or cache look-up) for both caption sets
        let (context, y) = self.conditioning(&d.planned, &d.samples, captions)?;
        let ts = d.ts.to_kind(Kind::Float);
        let unet = &self.model.unet;
        let (pred, preservation) = match self.plan.preservation.multiplier() {
            None => (unet.forward(&d.noisy, &ts, &context, &y), None),
            Some(_) => {
                let (ctx_p, y_p) = (context.narrow(0, b, b), y.narrow(0, b, b));
                let prior = tch::no_grad(|| {
                    (self.model.slots).without_network(|| unet.forward(&d.noisy, &ts, &ctx_p, &y_p))
                });
                let twice = |t: &Tensor| Tensor::cat(&[t, t], 0);
                let both = unet.forward(&twice(&d.noisy), &twice(&ts), &context, &y);
                let preserve = both.narrow(0, b, b).to_kind(Kind::Float);
                let term = preserve.mse_loss(&prior.to_kind(Kind::Float), tch::Reduction::Mean);
                (both.narrow(0, 0, b), Some(term))
            }
        };
        let huber = (self.plan.loss == Loss::Huber).then_some((&self.tables, &d.ts));
        let mut per = per_sample_loss(&pred, &d.target, huber, d.mask.as_ref());
        if let Some(g) = train.min_snr_gamma {
            per = &per * self.tables.min_snr_weights(&d.ts, g, self.v_pred);
        }
        if train.debiased_estimation_loss {
            per = &per * self.tables.debiased_weights(&d.ts, self.v_pred);
        }
        // regularisation samples come last in a batch
        let reg = self.data.reg_count(&d.samples);
        let loss = batch_loss(&per, reg, train.prior_loss_weight);
        let multiplier = self.plan.preservation.multiplier().unwrap_or(0.0);
        let loss = match &preservation {
            Some(term) => loss + term * multiplier,
            None => loss,
        };
        let scale = |t: Tensor| if d.factor == 1.0 { t } else { t * d.factor };
        Ok(Some(StepLoss {
            loss: scale(loss),
            preservation: preservation.map(|t| t.detach()),
        }))
    }

    /// Mean loss over the fixed validation set with fixed noise and timesteps.
    pub fn validation_loss(&self, items: &[Batch], seed: u64) -> Result<f64> {
        const TIMESTEPS: [i64; 5] = [100, 300, 500, 700, 900];
        let device = self.model.unet_device();
        // summed on the device; one host read per validation
        let mut total = Tensor::zeros([], (Kind::Float, device));
        for (i, (planned, samples)) in items.iter().enumerate() {
            // the caption as trained, without dropout or shuffling: the
            // trigger only where training puts it (issue 28: the reg set was
            // measured with it, so val_reg_loss rose as the trigger was
            // learned and could not show the prior drifting)
            let caption = self.data.captions[samples[0].dataset]
                .base(&self.data.images[samples[0].image].caption);
            tch::no_grad(|| -> Result<()> {
                let (x0, mask) = self.latents(planned, true, seed ^ (i as u64 * 7919), (0, 1))?;
                let (context, y) = self.conditioning(planned, samples, vec![caption])?;
                // stratified timesteps, fixed noise
                for (k, tv) in TIMESTEPS.iter().enumerate() {
                    tch::manual_seed((seed as i64 & 0xffff_ffff) + (i as i64) * 16 + k as i64);
                    let noise = x0.randn_like();
                    let ts = Tensor::from_slice(&[*tv]).to_device(device);
                    let (noisy, target) = self.noised(&x0, &noise, noise.shallow_clone(), &ts);
                    let pred =
                        self.model
                            .unet
                            .forward(&noisy, &ts.to_kind(Kind::Float), &context, &y);
                    total += per_sample_loss(&pred, &target, None, mask.as_ref()).mean(Kind::Float);
                }
                Ok(())
            })?;
        }
        let n = (items.len().max(1) * TIMESTEPS.len()) as f64;
        Ok(total.double_value(&[]) / n)
    }
}
