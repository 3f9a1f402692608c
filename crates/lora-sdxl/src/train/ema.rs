//! An exponential moving average of the LoRA's weights (`train.ema_decay`),
//! as diffusers' `EMAModel` keeps it: after optimizer step `n` (counting
//! from 1), `s ← s − (1 − d)·(s − p)` with
//!
//! ```text
//! d = 0                                     for n = 1 (the average starts at the weights)
//! d = min(decay, 1 − (1 + k)^(−power))      with power warm-up (ema_power), k = n − 1
//! d = min(decay, (1 + k)/(10 + k))          without
//! ```
//!
//! When it is on, the saved LoRA files hold the average; the state keeps
//! both, so a resumed run continues exactly.

use tch::Tensor;

/// The running average of a list of tensors.
#[derive(Debug)]
pub struct Ema {
    shadow: Vec<Tensor>,
    steps: u64,
    /// Highest decay.
    pub decay: f64,
    /// Power warm-up exponent (diffusers' `use_ema_warmup` with `inv_gamma = 1`).
    pub power: Option<f64>,
}

impl Ema {
    /// An average starting at `params` (copied).
    ///
    /// ```
    /// use lora_sdxl::train::ema::Ema;
    /// let p = tch::Tensor::ones([2], tch::kind::FLOAT_CPU);
    /// let mut ema = Ema::new(&[p.shallow_clone()], 0.99, None);
    /// ema.update(&[p * 3.0]);
    /// assert_eq!(ema.steps(), 1);
    /// ```
    pub fn new(params: &[Tensor], decay: f64, power: Option<f64>) -> Self {
        Self {
            shadow: params.iter().map(|p| p.detach().copy()).collect(),
            steps: 0,
            decay,
            power,
        }
    }

    /// The decay used at update `n` (1-based).
    pub fn decay_at(&self, n: u64) -> f64 {
        let k = n.saturating_sub(1) as f64;
        if k <= 0.0 {
            return 0.0;
        }
        let d = match self.power {
            Some(power) => 1.0 - (1.0 + k).powf(-power),
            None => (1.0 + k) / (10.0 + k),
        };
        d.min(self.decay).max(0.0)
    }

    /// Folds the current `params` (same order as at creation) in.
    pub fn update(&mut self, params: &[Tensor]) {
        self.steps += 1;
        let one_minus = 1.0 - self.decay_at(self.steps);
        tch::no_grad(|| {
            for (s, p) in self.shadow.iter_mut().zip(params) {
                let _ = s.g_sub_(&((&*s - p) * one_minus));
            }
        });
    }

    /// Updates folded in so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The averaged tensors.
    pub fn weights(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Replaces the average and its count (resume).
    pub fn restore(&mut self, shadow: Vec<Tensor>, steps: u64) {
        self.shadow = shadow;
        self.steps = steps;
    }
}

/// The trained tensors and their average, to evaluate what the saved LoRA
/// files hold (they hold the average). Shallow clones: both follow the
/// run's in-place updates, so one value serves the whole run.
pub(crate) struct SavedWeights {
    trained: Vec<Tensor>,
    average: Vec<Tensor>,
}

impl SavedWeights {
    /// `trained` as the EMA was created over (same order).
    pub(crate) fn new(trained: &[Tensor], ema: &Ema) -> Self {
        Self {
            trained: trained.iter().map(Tensor::shallow_clone).collect(),
            average: ema.weights().iter().map(Tensor::shallow_clone).collect(),
        }
    }

    /// Runs `f` with the average copied into the trained tensors, then puts
    /// the trained values back, bit for bit.
    pub(crate) fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        let put = |from: &[Tensor]| {
            tch::no_grad(|| {
                for (p, v) in self.trained.iter().zip(from) {
                    p.shallow_clone().copy_(v);
                }
            })
        };
        let kept: Vec<Tensor> = tch::no_grad(|| self.trained.iter().map(Tensor::copy).collect());
        put(&self.average);
        let out = f();
        put(&kept);
        out
    }
}
