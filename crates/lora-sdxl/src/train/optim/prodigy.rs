//! Prodigy (Mishchenko & Defazio 2023): Adam whose step size `d` estimates
//! itself from how far the weights have moved, as the `prodigyopt` package
//! (1.1) computes it — the "no learning-rate tuning" optimizer of most
//! character-LoRA guides (`lr = 1.0`). One instance covers every parameter
//! group: `d` is shared, as in the package, and groups may only differ by
//! having a rate of 0.
//!
//! Per step, with `dlr = d · lr · bc` (`bc` the optional bias correction):
//!
//! ```text
//! num ← β₃ · num + Σ (d/d₀) · dlr · ⟨g, p₀ − p⟩
//! m   ← β₁ m + d (1 − β₁) g            v ← β₂ v + d² (1 − β₂) g²
//! s   ← β₃ s + (d/d₀) · dlr · g        (safeguard_warmup: (d/d₀) · d · g)
//! d̂   = d_coef · num / Σ|s|
//! d   ← min(max(d_max, d̂), d · growth_rate)   (max(d, d̂) first while d = d₀)
//! p   ← p − dlr · wd · p − dlr · m / (√v + d · ε)
//! ```
//!
//! The package reads `num`, `Σ|s|` and `d` back to the host every step;
//! here they stay 0-dim f64 tensors on the device, so a step never waits
//! for the GPU. Its "no gradient signal yet" early return (`Σ|s| = 0`: the
//! moments are updated but `d`, the step count and the weights are not) is
//! reproduced with masks.

use tch::{Kind, Tensor};

use super::Optimizer;

/// Prodigy's settings (the package's keyword arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct ProdigyConfig {
    /// β₁, β₂.
    pub betas: (f64, f64),
    /// β₃ (default √β₂).
    pub beta3: Option<f64>,
    /// ε.
    pub eps: f64,
    /// Weight decay (decoupled: scaled by `dlr`, as AdamW's by its rate).
    pub weight_decay: f64,
    /// Decoupled (AdamW-style) weight decay instead of adding it to the gradient.
    pub decouple: bool,
    /// Adam's bias correction folded into `dlr`.
    pub use_bias_correction: bool,
    /// Leave `lr` out of the `s` accumulator (steadier with warm-up).
    pub safeguard_warmup: bool,
    /// Initial `d`.
    pub d0: f64,
    /// Multiplies the estimate `d̂`.
    pub d_coef: f64,
    /// Most `d` may grow per step.
    pub growth_rate: f64,
    /// Keep `s` and `p₀` for every `slice_p`-th element only (less memory).
    pub slice_p: i64,
}

impl Default for ProdigyConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
            slice_p: 1,
        }
    }
}

/// One parameter's state.
#[derive(Debug)]
struct Slot {
    p: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    s: Tensor,
    p0: Option<Tensor>,
}

/// Prodigy over parameter groups (see the module docs).
#[derive(Debug)]
pub struct Prodigy {
    cfg: ProdigyConfig,
    groups: Vec<Vec<Slot>>,
    /// `d`, `d_max`, `d_numerator` and the step count `k`: 0-dim f64.
    d: Tensor,
    d_max: Tensor,
    numerator: Tensor,
    k: Tensor,
    steps: u64,
}

impl Prodigy {
    /// Prodigy over `groups` of leaf tensors.
    ///
    /// ```no_run
    /// use lora_sdxl::train::optim::{Optimizer, Prodigy, ProdigyConfig};
    /// let w = tch::Tensor::ones([4, 4], tch::kind::FLOAT_CPU).set_requires_grad(true);
    /// let mut opt = Prodigy::new(vec![vec![w.shallow_clone()]], ProdigyConfig::default());
    /// (&w * &w).sum(tch::Kind::Float).backward();
    /// opt.step(&[1.0]);
    /// ```
    pub fn new(groups: Vec<Vec<Tensor>>, cfg: ProdigyConfig) -> Self {
        let device = groups
            .iter()
            .flatten()
            .next()
            .map_or(tch::Device::Cpu, |p| p.device());
        let scalar = |x: f64| Tensor::from(x).to_kind(Kind::Double).to_device(device);
        let groups = groups
            .into_iter()
            .map(|g| {
                g.into_iter()
                    .map(|p| Slot {
                        exp_avg: p.zeros_like(),
                        exp_avg_sq: p.zeros_like(),
                        s: Self::sliced(&p, cfg.slice_p).zeros_like(),
                        p0: None,
                        p,
                    })
                    .collect()
            })
            .collect();
        Self {
            d: scalar(cfg.d0),
            d_max: scalar(cfg.d0),
            numerator: scalar(0.0),
            k: scalar(0.0),
            steps: 0,
            cfg,
            groups,
        }
    }

    fn sliced(t: &Tensor, slice_p: i64) -> Tensor {
        t.detach().flatten(0, -1).slice(0, 0, None, slice_p)
    }

    /// The current step-size estimate `d` (a host sync: for logs and tests).
    pub fn d(&self) -> f64 {
        self.d.double_value(&[])
    }

    /// The package's step; long because its two passes share many locals
    /// (the second uses the `d` that the first estimates).
    fn update(&mut self, lrs: &[f64]) {
        let cfg = &self.cfg;
        let (b1, b2) = cfg.betas;
        let b3 = cfg.beta3.unwrap_or(b2.sqrt());
        // Groups without parameters (text encoders not trained) take no part,
        // as they are absent from a kohya run.
        let lr = (self.groups.iter().zip(lrs))
            .filter(|(g, _)| !g.is_empty())
            .fold(0.0, |m, (_, &r)| f64::max(m, r));
        let f32 = |t: &Tensor| t.to_kind(Kind::Float);
        let d = self.d.shallow_clone();
        // Computed from the device's k: no host-to-device copy (a sync on CUDA).
        let dlr = if cfg.use_bias_correction {
            let k1 = &self.k + 1.0;
            let pow = |b: f64| Tensor::pow_scalar(b, &k1);
            &d * lr * (pow(b2).g_mul_scalar(-1.0) + 1.0).sqrt() / (pow(b1).g_mul_scalar(-1.0) + 1.0)
        } else {
            &d * lr
        };
        let ratio = (&d / cfg.d0) * &dlr; // (d/d₀)·dlr
        let s_alpha = if cfg.safeguard_warmup {
            (&d / cfg.d0) * &d
        } else {
            ratio.shallow_clone()
        };
        // The per-parameter factors, once per step.
        let (m_alpha, v_alpha) = (f32(&(&d * (1.0 - b1))), f32(&(&d * &d * (1.0 - b2))));
        let s_alpha = f32(&s_alpha);
        let mut numerator = &self.numerator * b3;
        let mut denom = d.zeros_like();
        for (group, &group_lr) in self.groups.iter_mut().zip(lrs) {
            if !group.is_empty() && group_lr != lr && group_lr != 0.0 {
                panic!(
                    "Prodigy: groups may only differ by a rate of 0 (checked when the job is read)"
                );
            }
            for slot in group.iter_mut() {
                let mut g = slot.p.grad();
                if !g.defined() {
                    continue;
                }
                if cfg.weight_decay != 0.0 && !cfg.decouple {
                    g = &g + &slot.p.detach() * cfg.weight_decay;
                }
                let p0 = slot
                    .p0
                    .get_or_insert_with(|| Self::sliced(&slot.p, cfg.slice_p).copy());
                if group_lr > 0.0 {
                    let sg = Self::sliced(&g, cfg.slice_p);
                    let dot = sg.dot(&(&*p0 - Self::sliced(&slot.p, cfg.slice_p)));
                    numerator += &ratio * dot.to_kind(Kind::Double);
                    slot.exp_avg = &slot.exp_avg * b1 + &g * &m_alpha;
                    // addcmul's order, v + (value · g) · g.
                    slot.exp_avg_sq = &slot.exp_avg_sq * b2 + &g * &v_alpha * &g;
                    slot.s = &slot.s * b3 + sg * &s_alpha;
                    denom += slot.s.abs().sum(Kind::Float).to_kind(Kind::Double);
                }
            }
        }
        // Σ|s| = 0: the package returns here (moments kept, nothing else).
        let live = denom.gt(0.0);
        let (mut new_d, mut d_max) = (d.shallow_clone(), self.d_max.shallow_clone());
        if lr > 0.0 {
            let d_hat = (&numerator * cfg.d_coef) / denom.where_scalarother(&live, 1.0);
            let first = d.eq(cfg.d0);
            new_d = d.maximum(&d_hat).where_self(&first, &d);
            d_max = d_max.maximum(&d_hat);
            new_d = d_max.minimum(&(&new_d * cfg.growth_rate));
        }
        self.d = new_d.where_self(&live, &d);
        self.d_max = d_max.where_self(&live, &self.d_max);
        self.numerator = numerator.where_self(&live, &self.numerator);
        self.k = (&self.k + 1.0).where_self(&live, &self.k);
        let eps_d = f32(&self.d) * cfg.eps;
        let dlr = f32(&dlr.where_scalarother(&live, 0.0));
        let (neg_dlr, decay) = (-&dlr, &dlr * cfg.weight_decay);
        for slot in self.groups.iter_mut().flatten() {
            let g = slot.p.grad();
            if !g.defined() {
                continue;
            }
            let mut p = slot.p.shallow_clone();
            let denom = slot.exp_avg_sq.sqrt() + &eps_d;
            if cfg.weight_decay != 0.0 && cfg.decouple {
                let _ = p.g_sub_(&(&p * &decay));
            }
            // addcdiv's order, p + (−dlr · m) / denom: the same roundings as the package.
            let _ = p.g_add_(&(&slot.exp_avg * &neg_dlr / denom));
        }
    }
}

impl Optimizer for Prodigy {
    fn step(&mut self, lrs: &[f64]) {
        self.steps += 1;
        tch::no_grad(|| self.update(lrs));
    }
    fn steps_taken(&self) -> u64 {
        self.steps
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        let mut out = vec![
            ("prodigy.d".to_string(), cpu(&self.d)),
            ("prodigy.d_max".to_string(), cpu(&self.d_max)),
            ("prodigy.d_numerator".to_string(), cpu(&self.numerator)),
            ("prodigy.k".to_string(), cpu(&self.k)),
        ];
        for (gi, group) in self.groups.iter().enumerate() {
            for (i, slot) in group.iter().enumerate() {
                let name = |n: &str| format!("prodigy.{gi}.{i}.{n}");
                out.push((name("m"), cpu(&slot.exp_avg)));
                out.push((name("v"), cpu(&slot.exp_avg_sq)));
                out.push((name("s"), cpu(&slot.s)));
                if let Some(p0) = &slot.p0 {
                    out.push((name("p0"), cpu(p0)));
                }
            }
        }
        out
    }
    fn load_state(
        &mut self,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        let device = self.d.device();
        let need = |n: String| get(&n).map(|t| t.to_device(device)).ok_or(n);
        self.d = need("prodigy.d".into())?;
        self.d_max = need("prodigy.d_max".into())?;
        self.numerator = need("prodigy.d_numerator".into())?;
        self.k = need("prodigy.k".into())?;
        for (gi, group) in self.groups.iter_mut().enumerate() {
            for (i, slot) in group.iter_mut().enumerate() {
                let name = |n: &str| format!("prodigy.{gi}.{i}.{n}");
                slot.exp_avg = need(name("m"))?;
                slot.exp_avg_sq = need(name("v"))?;
                slot.s = need(name("s"))?;
                slot.p0 = get(&name("p0")).map(|t| t.to_device(device));
            }
        }
        self.steps = steps;
        Ok(())
    }
    fn family(&self) -> &'static str {
        "prodigy"
    }
}
