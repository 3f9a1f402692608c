//! Adafactor (Shazeer & Stern 2018) as `transformers.optimization.Adafactor`
//! computes it: the second moment of a matrix is kept as its row and column
//! means (factored, far less memory), updates are clipped by their RMS, and
//! the step size is either the given rate (kohya's SDXL recipe:
//! `relative_step=False, scale_parameter=False, warmup_init=False`) or the
//! relative one, `min(1e-2, 1/√t)` (`1e-6·t` while warming up), scaled by the
//! weights' RMS when `scale_parameter` is on.
//!
//! The package compares the weights' RMS with ε₂ on the host; here that
//! stays a tensor operation, so a step never waits for the GPU.

use super::counts::StepCounts;
use super::PerParam;
use tch::{Kind, Tensor};

/// Adafactor's settings (the package's keyword arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorConfig {
    /// ε₁ (added to g²) and ε₂ (lowest weight RMS for `scale_parameter`).
    pub eps: (f64, f64),
    /// Updates are scaled down to at most this RMS.
    pub clip_threshold: f64,
    /// β₂ₜ = 1 − t^decay_rate.
    pub decay_rate: f64,
    /// First-moment decay; `None` keeps no first moment.
    pub beta1: Option<f64>,
    /// Weight decay (scaled by the step size).
    pub weight_decay: f64,
    /// Scale the step size by the weights' RMS.
    pub scale_parameter: bool,
    /// Ignore the given rate; use `min(1e-2, 1/√t)`.
    pub relative_step: bool,
    /// With `relative_step`: `min(1e-6·t, 1/√t)`.
    pub warmup_init: bool,
}

impl AdafactorConfig {
    /// kohya's SDXL setting: the given rate, no parameter scaling.
    pub fn fixed_lr() -> Self {
        Self {
            scale_parameter: false,
            relative_step: false,
            ..Self::default()
        }
    }
}

impl Default for AdafactorConfig {
    /// The package's defaults (relative step, parameter scaling).
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

/// One parameter's state.
#[derive(Debug)]
enum Second {
    /// Row and column means of g² (tensors of two or more dimensions).
    Factored { row: Tensor, col: Tensor },
    /// The whole g² average (vectors).
    Full(Tensor),
}

/// Adafactor over a list of parameters.
#[derive(Debug)]
pub struct Adafactor {
    cfg: AdafactorConfig,
    params: Vec<Tensor>,
    second: Vec<Second>,
    first: Vec<Option<Tensor>>,
    step: u64,
    /// Each parameter's own updates (its relative step and β₂'s `t`).
    counts: StepCounts,
}

fn rms(t: &Tensor) -> Tensor {
    t.norm() / (t.numel() as f64).sqrt()
}

impl Adafactor {
    /// Adafactor over `params`.
    ///
    /// ```no_run
    /// use lora_sdxl::train::optim::adafactor::{Adafactor, AdafactorConfig};
    /// use lora_sdxl::train::optim::PerParam;
    /// let w = tch::Tensor::ones([4, 8], tch::kind::FLOAT_CPU).set_requires_grad(true);
    /// let mut opt = Adafactor::new(vec![w.shallow_clone()], AdafactorConfig::fixed_lr());
    /// (&w * &w).sum(tch::Kind::Float).backward();
    /// opt.step(1e-4);
    /// ```
    pub fn new(params: Vec<Tensor>, cfg: AdafactorConfig) -> Self {
        let second = params
            .iter()
            .map(|p| {
                let s = p.size();
                if s.len() >= 2 {
                    let opts = (Kind::Float, p.device());
                    let col: Vec<i64> = s[..s.len() - 2]
                        .iter()
                        .chain(&s[s.len() - 1..])
                        .cloned()
                        .collect();
                    Second::Factored {
                        row: Tensor::zeros(&s[..s.len() - 1], opts),
                        col: Tensor::zeros(col.as_slice(), opts),
                    }
                } else {
                    Second::Full(p.zeros_like())
                }
            })
            .collect();
        let first = params
            .iter()
            .map(|p| cfg.beta1.map(|_| p.zeros_like()))
            .collect();
        Self {
            cfg,
            counts: StepCounts::new(params.len()),
            params,
            second,
            first,
            step: 0,
        }
    }
}

impl PerParam for Adafactor {
    /// One update; `lr` is ignored with `relative_step`. A parameter
    /// without a gradient is skipped and keeps its count (transformers'
    /// `state["step"]`, see [`StepCounts`]).
    fn step(&mut self, lr: f64) {
        self.step += 1;
        let cfg = &self.cfg;
        tch::no_grad(|| {
            for (i, ((p, second), first)) in self
                .params
                .iter()
                .zip(&mut self.second)
                .zip(&mut self.first)
                .enumerate()
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let t = self.counts.advance(i) as f64;
                let rel = if cfg.relative_step {
                    let min_step = if cfg.warmup_init { 1e-6 * t } else { 1e-2 };
                    min_step.min(1.0 / t.sqrt())
                } else {
                    lr
                };
                let beta2t = 1.0 - t.powf(cfg.decay_rate);
                let g = g.to_kind(Kind::Float);
                // The step size: a tensor when scaled by the weights' RMS, else
                // the host number itself (no host-to-device copy per parameter).
                let scaled = cfg
                    .scale_parameter
                    .then(|| rms(p).clamp_min(cfg.eps.1) * rel);
                let sq = &g * &g + cfg.eps.0;
                let mut update = match second {
                    Second::Factored { row, col } => {
                        *row =
                            &*row * beta2t + sq.mean_dim(-1, false, Kind::Float) * (1.0 - beta2t);
                        *col =
                            &*col * beta2t + sq.mean_dim(-2, false, Kind::Float) * (1.0 - beta2t);
                        let r = (&*row / row.mean_dim(-1, true, Kind::Float))
                            .rsqrt()
                            .unsqueeze(-1);
                        let cf = col.unsqueeze(-2).rsqrt();
                        r * cf * &g
                    }
                    Second::Full(v) => {
                        *v = &*v * beta2t + sq * (1.0 - beta2t);
                        v.rsqrt() * &g
                    }
                };
                update = &update / (rms(&update) / cfg.clip_threshold).clamp_min(1.0);
                update = match &scaled {
                    Some(alpha) => update * alpha,
                    None => update * rel,
                };
                if let (Some(b1), Some(m)) = (cfg.beta1, first.as_mut()) {
                    *m = &*m * b1 + &update * (1.0 - b1);
                    update = m.shallow_clone();
                }
                let mut p = p.shallow_clone();
                if cfg.weight_decay != 0.0 {
                    let decay = match &scaled {
                        Some(alpha) => &p * (alpha * cfg.weight_decay),
                        None => &p * (rel * cfg.weight_decay),
                    };
                    let _ = p.g_sub_(&decay);
                }
                let _ = p.g_sub_(&update);
            }
        });
    }
    fn steps_taken(&self) -> u64 {
        self.step
    }
    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        let mut out = Vec::new();
        for (i, (second, first)) in self.second.iter().zip(&self.first).enumerate() {
            match second {
                Second::Factored { row, col } => {
                    out.push((format!("{prefix}.{i}.row"), cpu(row)));
                    out.push((format!("{prefix}.{i}.col"), cpu(col)));
                }
                Second::Full(v) => out.push((format!("{prefix}.{i}.v"), cpu(v))),
            }
            if let Some(m) = first {
                out.push((format!("{prefix}.{i}.m"), cpu(m)));
            }
        }
        out.extend(self.counts.state_tensor(prefix, self.step));
        out
    }
    fn load_state(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        for (i, ((second, first), p)) in (self.second.iter_mut().zip(&mut self.first))
            .zip(&self.params)
            .enumerate()
        {
            let need = |n: &str| {
                let name = format!("{prefix}.{i}.{n}");
                get(&name).map(|t| t.to_device(p.device())).ok_or(name)
            };
            match second {
                Second::Factored { row, col } => {
                    *row = need("row")?;
                    *col = need("col")?;
                }
                Second::Full(v) => *v = need("v")?,
            }
            if let Some(m) = first {
                *m = need("m")?;
            }
        }
        self.step = steps;
        self.counts.load(prefix, get, steps)
    }
}
