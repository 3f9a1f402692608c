//! AdamW over raw tensors (decoupled weight decay, as `torch.optim.AdamW`) and
//! gradient-norm clipping, both without host synchronisation.

use tch::{Kind, Tensor};

/// AdamW state for a list of parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    step: u64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl AdamW {
    /// Optimizer over `params` (leaf tensors with `requires_grad`).
    pub fn new(params: Vec<Tensor>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        let zeros = |v: &Vec<Tensor>| v.iter().map(|p| p.zeros_like()).collect();
        Self {
            exp_avg: zeros(&params),
            exp_avg_sq: zeros(&params),
            params,
            step: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        }
    }
    /// Updates taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }
    /// One update at learning rate `lr`. Parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        tch::no_grad(|| {
            for ((p, m), v) in self
                .params
                .iter()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                // torch's single-tensor AdamW: in-place updates, few kernels.
                let mut p = p.shallow_clone();
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let _ = v
                    .g_mul_scalar_(self.beta2)
                    .addcmul_(&g, &(&g * (1.0 - self.beta2)));
                // p -= lr/bc1 · m / (√v/√bc2 + eps), as one addcdiv with the
                // step size folded into the denominator.
                if lr == 0.0 {
                    continue;
                }
                let mut denom = v.sqrt();
                let _ = denom
                    .g_div_scalar_(bc2.sqrt())
                    .g_add_scalar_(self.eps)
                    .g_mul_scalar_(-bc1 / lr);
                let _ = p.addcdiv_(m, &denom);
            }
        });
    }
    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    /// Moments (for saving a resumable state): `(exp_avg, exp_avg_sq)` per parameter.
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.exp_avg, &self.exp_avg_sq)
    }
    /// Restores moments and the step counter.
    pub fn restore(&mut self, exp_avg: Vec<Tensor>, exp_avg_sq: Vec<Tensor>, step: u64) {
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.step = step;
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`), returning the norm before clipping as a
/// 0-dim tensor (read it only when you need it: that is a host sync).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Tensor {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    let Some(first) = grads.first() else {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    };
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).norm())
        .collect();
    let total = Tensor::stack(&norms, 0).norm().to_device(first.device());
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    tch::no_grad(|| {
        for g in &grads {
            let mut g = g.shallow_clone();
            let _ = g.g_mul_(&coef.to_kind(g.kind()));
        }
    });
    total
}
