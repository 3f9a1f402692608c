//! Which timesteps a training step draws (`train.timestep_sampling`), as
//! OneTrainer's `timestep_distribution` defines them:
//!
//! - `uniform`: every timestep in `[min_timestep, max_timestep)` equally;
//! - `logit_normal`: `sigmoid(N(sigmoid_bias, sigmoid_scale + 1))` scaled to
//!   the range (SD3's logit-normal; OneTrainer's `noising_bias` /
//!   `noising_weight + 1`);
//! - `sigmoid`: a discrete distribution over the range with weights
//!   `sigmoid(sigmoid_scale · (x − (sigmoid_bias + 0.5)))`, `x` in `[0, 1]`
//!   — more high-noise steps for a positive scale.
//!
//! `timestep_shift` (OneTrainer's `timestep_shift`, 1 = none) warps the draws
//! by `t ↦ T·s·t / ((s − 1)·t + T)`, toward noise for `s > 1`; like
//! OneTrainer it is applied after the range, so with `max_timestep < 1000` a
//! shift above 1 reaches past it. The distribution does not depend on the
//! prediction type: ε and v models draw alike.
//!
//! Draws stay on the device (no host round trip per step).

use super::job::TrainSection;
use super::schedule::NUM_TIMESTEPS;
use tch::{Device, Kind, Tensor};

super::choice::choices! {
    /// `train.timestep_sampling`.
    pub enum TimestepSampling {
        /// Uniform over the range.
        Uniform = "uniform",
        /// Discrete sigmoid-weighted.
        Sigmoid = "sigmoid",
        /// Logit-normal.
        LogitNormal = "logit_normal",
    }
}

/// How a sampler draws (the sigmoid's weights built once, on the device).
#[derive(Debug)]
enum Draw {
    /// torch's `randint` over the range (uniform without a shift).
    Randint,
    /// A uniform unit draw through [`TimestepSampler::from_unit`].
    Uniform,
    /// A logit-normal unit draw through [`TimestepSampler::from_unit`].
    LogitNormal,
    /// `multinomial` over the weights of `min..max`.
    Sigmoid(Tensor),
}

/// Draws a step's timesteps.
#[derive(Debug)]
pub struct TimestepSampler {
    draw: Draw,
    min: i64,
    max: i64,
    shift: f64,
    scale: f64,
    bias: f64,
}

impl TimestepSampler {
    /// The sampler of a job's `[train]` drawing as `kind` (the plan's
    /// `timestep_sampling`) on `device`.
    pub fn new(train: &TrainSection, kind: TimestepSampling, device: Device) -> Self {
        let (min, max) = (i64::from(train.min_timestep), i64::from(train.max_timestep));
        let scale = train.sigmoid_scale.unwrap_or(0.0);
        let bias = train.sigmoid_bias;
        let shift = train.timestep_shift;
        let draw = match kind {
            TimestepSampling::Uniform if shift == 1.0 => Draw::Randint,
            TimestepSampling::Uniform => Draw::Uniform,
            TimestepSampling::LogitNormal => Draw::LogitNormal,
            TimestepSampling::Sigmoid => {
                Draw::Sigmoid(sigmoid_weights(max - min, scale, bias, shift).to_device(device))
            }
        };
        Self {
            draw,
            min,
            max,
            shift,
            scale,
            bias,
        }
    }

    /// `b` timesteps (`Int64` on `device`), drawn with torch's generator.
    pub fn sample(&self, b: i64, device: Device) -> Tensor {
        let opts = (Kind::Float, device);
        match &self.draw {
            // the plain draw, unchanged from before the option existed
            Draw::Randint => Tensor::randint_low(self.min, self.max, [b], (Kind::Int64, device)),
            Draw::Uniform => self.from_unit(&Tensor::rand([b], opts)),
            Draw::LogitNormal => {
                let normal = Tensor::randn([b], opts) * (self.scale + 1.0) + self.bias;
                self.from_unit(&normal.sigmoid())
            }
            Draw::Sigmoid(w) => w.multinomial(b, true) + self.min,
        }
    }

    /// OneTrainer's continuous path: `u ∈ [0, 1)` ↦ `min + u·(max − min)`,
    /// shifted, truncated to an integer (and kept inside the schedule).
    pub fn from_unit(&self, u: &Tensor) -> Tensor {
        let t = u * (self.max - self.min) as f64 + self.min as f64;
        let n = NUM_TIMESTEPS as f64;
        let shifted = if self.shift == 1.0 {
            t
        } else {
            (&t * (n * self.shift)) / (&t * (self.shift - 1.0) + n)
        };
        shifted
            .to_kind(Kind::Int64)
            .clamp(0, NUM_TIMESTEPS as i64 - 1)
    }
}

/// The `sigmoid` distribution's weights over `n` timesteps (OneTrainer's
/// discrete path, in fp32 as it computes them): on `x = linspace(0, 1, n)`
/// moved by the inverse shift `x / (s − s·x + x)`, the sigmoid is evaluated
/// at that point shifted once more (as OneTrainer does) and multiplied by the
/// inverse shift's derivative `s / (s + x − s·x)²`, the width of a shifted
/// bucket. Unnormalised (`multinomial` normalises).
pub fn sigmoid_weights(n: i64, scale: f64, bias: f64, shift: f64) -> Tensor {
    let inverse = |x: &Tensor| x / (x * (1.0 - shift) + shift);
    let x = Tensor::linspace(0.0, 1.0, n, (Kind::Float, Device::Cpu));
    let moved = inverse(&x);
    let derivative = (&x * (1.0 - shift) + shift).square().reciprocal() * shift;
    ((inverse(&moved) - (bias + 0.5)) * scale).sigmoid() * derivative
}
