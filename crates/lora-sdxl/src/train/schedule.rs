//! Training targets and loss weights on SDXL's noise schedule
//! ([`NoiseSchedule`], kohya-format.md §8), and learning-rate schedules.
//!
//! Per-step quantities are gathered on the device from small tables, so a
//! training step needs no host round trip.

pub use crate::model::schedule::{NoiseSchedule, NUM_TIMESTEPS};
use tch::{Device, Kind, Tensor};

/// Per-timestep tables on the training device.
#[derive(Debug)]
pub struct ScheduleTables {
    /// √ᾱ_t.
    pub sqrt_alpha: Tensor,
    /// √(1 − ᾱ_t).
    pub sqrt_one_minus: Tensor,
    /// ᾱ_t / (1 − ᾱ_t) of the original schedule.
    pub snr: Tensor,
}

fn per_sample(table: &Tensor, t: &Tensor, like: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, like.dim().saturating_sub(1)));
    table
        .index_select(0, t)
        .view(shape.as_slice())
        .to_kind(like.kind())
}

impl ScheduleTables {
    /// The device tables of `schedule` used in a training step.
    pub fn new(schedule: &NoiseSchedule, device: Device) -> Self {
        let t = |v: Vec<f64>| {
            Tensor::from_slice(&v)
                .to_kind(Kind::Float)
                .to_device(device)
        };
        let ac = schedule.alphas_cumprod();
        Self {
            sqrt_alpha: t(ac.iter().map(|a| a.sqrt()).collect()),
            sqrt_one_minus: t(ac.iter().map(|a| (1.0 - a).sqrt()).collect()),
            snr: t(schedule.snr().to_vec()),
        }
    }
    /// `x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε` for integer timesteps `t` `[B]`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        per_sample(&self.sqrt_alpha, t, x0) * x0 + per_sample(&self.sqrt_one_minus, t, x0) * noise
    }
    /// v-prediction target `√ᾱ_t·ε − √(1−ᾱ_t)·x₀`.
    pub fn v_target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Tensor {
        per_sample(&self.sqrt_alpha, t, x0) * noise - per_sample(&self.sqrt_one_minus, t, x0) * x0
    }
    /// Min-SNR-γ weights `[B]`: `min(snr, γ)/snr` (ε) or `min(snr, γ)/(snr+1)` (v).
    pub fn min_snr_weights(&self, t: &Tensor, gamma: f64, v_prediction: bool) -> Tensor {
        let snr = self.snr.index_select(0, t);
        let clipped = snr.clamp_max(gamma);
        if v_prediction {
            clipped / (snr + 1.0)
        } else {
            clipped / snr
        }
    }
    /// kohya's debiased-estimation weights `[B]` (`debiased_estimation_loss`):
    /// `1/√snr` (ε) or `1/(snr+1)` (v), with the SNR capped at 1000 (t = 0).
    pub fn debiased_weights(&self, t: &Tensor, v_prediction: bool) -> Tensor {
        let snr = self.snr.index_select(0, t).clamp_max(1000.0);
        if v_prediction {
            (snr + 1.0).reciprocal()
        } else {
            snr.rsqrt()
        }
    }
}

/// A loss mask `[B, 1, H, W]` (image resolution) on the latent grid
/// `h × w`, averaged over each cell (torch's `interpolate(mode="area")`, as
/// kohya's `apply_masked_loss` resizes it).
pub fn latent_mask(mask: &Tensor, h: i64, w: i64) -> Tensor {
    mask.to_kind(Kind::Float).adaptive_avg_pool2d([h, w])
}

/// Per-sample loss `[B]` (mean over C, H, W) in fp32: `l2` or kohya's SNR-scheduled
/// Huber `2c(√(d²+c²) − c)` with `c = (1−0.1)/(1+σ_t)² + 0.1`; with a latent
/// `mask` `[B, 1, h, w]` each element is weighted by it before the mean
/// (kohya's masked loss: not renormalised by the mask's area).
pub fn per_sample_loss(
    pred: &Tensor,
    target: &Tensor,
    huber: Option<(&ScheduleTables, &Tensor)>,
    mask: Option<&Tensor>,
) -> Tensor {
    let d = pred.to_kind(Kind::Float) - target.to_kind(Kind::Float);
    let elem = match huber {
        None => d.square(),
        Some((tables, t)) => {
            let sigma =
                per_sample(&tables.sqrt_one_minus, t, &d) / per_sample(&tables.sqrt_alpha, t, &d);
            let c: Tensor = (1.0 - 0.1) / (sigma + 1.0).square() + 0.1;
            ((d.square() + c.square()).sqrt() - &c) * (c * 2.0)
        }
    };
    let elem = match mask {
        Some(m) => elem * m,
        None => elem,
    };
    let dims: Vec<i64> = (1..elem.dim() as i64).collect();
    elem.mean_dim(dims.as_slice(), false, Kind::Float)
}

/// The batch loss from per-sample losses `[B]` whose last `reg` samples are
/// regularisation images weighted by `prior_loss_weight` (kohya:
/// `(loss * loss_weights).mean()`), without building a weight tensor on the
/// host (no copy to the device per step).
pub fn batch_loss(per: &Tensor, reg: usize, prior_loss_weight: f64) -> Tensor {
    let b = per.size()[0];
    let reg = (reg as i64).min(b);
    if reg == 0 {
        return per.mean(Kind::Float);
    }
    let train = per.narrow(0, 0, b - reg).sum(Kind::Float);
    let prior = per.narrow(0, b - reg, reg).sum(Kind::Float) * prior_loss_weight;
    (train + prior) / b as f64
}

super::choice::choices! {
    /// Learning-rate schedules (diffusers `get_scheduler` semantics).
    pub enum LrSchedule {
        /// Constant.
        Constant = "constant",
        /// Linear warm-up, then constant.
        ConstantWithWarmup = "constant_with_warmup",
        /// Warm-up, then half a cosine to 0.
        Cosine = "cosine",
        /// Warm-up, then linear decay to 0.
        Linear = "linear",
        /// Warm-up, then `train.lr_scheduler_num_cycles` cosines, each
        /// restarting at the full rate (diffusers' hard restarts).
        CosineWithRestarts = "cosine_with_restarts",
    }
}

impl LrSchedule {
    /// The schedule a job runs: `constant` with `warmup_steps > 0` runs as
    /// `constant_with_warmup` (diffusers' `constant` would silently ignore
    /// the warm-up the user asked for); the second value says so, for the log.
    pub fn for_job(self, warmup: u64) -> (Self, Option<String>) {
        if self == Self::Constant && warmup > 0 {
            (
                Self::ConstantWithWarmup,
                Some(format!(
                    "train.warmup_steps = {warmup} with lr_scheduler = \"constant\": running \"constant_with_warmup\" (a constant schedule has no warm-up)"
                )),
            )
        } else {
            (self, None)
        }
    }
    /// The learning rate at optimizer step `step` (0-based) of `total`,
    /// after `warmup` steps; `cycles` is the number of cosines of
    /// `cosine_with_restarts` (the other schedules have one).
    ///
    /// ```
    /// use lora_sdxl::train::schedule::LrSchedule;
    /// let s = LrSchedule::CosineWithRestarts;
    /// // two cycles over 100 steps: the second restarts at the full rate
    /// assert_eq!(s.lr(1.0, 50, 100, 0, 2), 1.0);
    /// assert!(s.lr(1.0, 49, 100, 0, 2) < 0.01);
    /// ```
    pub fn lr(self, base: f64, step: u64, total: u64, warmup: u64, cycles: u32) -> f64 {
        let (s, w, n) = (step as f64, warmup as f64, total as f64);
        if self != Self::Constant && step < warmup {
            return base * s / w.max(1.0);
        }
        let progress = ((s - w) / (n - w).max(1.0)).clamp(0.0, 1.0);
        base * match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            Self::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Self::CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    let phase = (f64::from(cycles) * progress) % 1.0;
                    0.5 * (1.0 + (std::f64::consts::PI * phase).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Losses and weights chosen so that every sum, product and quotient is
    /// exact in fp32: both ways of weighting give the same bits, in any
    /// order of summation.
    #[test]
    fn regularisation_samples_are_weighted_as_kohya_weights_them() {
        let per = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 5.0]);
        let weights = Tensor::from_slice(&[1.0f32, 1.0, 0.5, 0.5]);
        let want = (&per * &weights).mean(Kind::Float).double_value(&[]);
        assert_eq!(want, 1.75);
        assert_eq!(batch_loss(&per, 2, 0.5).double_value(&[]), want);
        assert_eq!(batch_loss(&per, 0, 0.5).double_value(&[]), 2.75);
        assert_eq!(batch_loss(&per, 4, 2.0).double_value(&[]), 5.5);
    }
}
