//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")
//! as `lion_pytorch.Lion` computes it, which is what kohya's
//! `optimizer_type = "Lion"` uses: the update is the sign of an interpolation
//! of the momentum and the gradient, so every element moves by exactly `lr`.
//!
//! ```text
//! p ← p · (1 − lr · wd)
//! p ← p − lr · sign(β₁ m + (1 − β₁) g)
//! m ← β₂ m + (1 − β₂) g
//! ```

use super::PerParam;
use tch::Tensor;

/// Lion over a list of parameters (one fp32 momentum each).
#[derive(Debug)]
pub struct Lion {
    params: Vec<Tensor>,
    exp_avg: Vec<Tensor>,
    step: u64,
    /// β₁ (interpolation for the update).
    pub beta1: f64,
    /// β₂ (momentum decay).
    pub beta2: f64,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl Lion {
    /// Lion over `params` (leaf tensors with `requires_grad`); the
    /// package's defaults are β = (0.9, 0.99), no weight decay.
    ///
    /// ```no_run
    /// use lora_sdxl::train::optim::{Lion, PerParam};
    /// let w = tch::Tensor::zeros([4, 4], tch::kind::FLOAT_CPU).set_requires_grad(true);
    /// let mut opt = Lion::new(vec![w.shallow_clone()], 0.9, 0.99, 0.0);
    /// (&w * 2.0).sum(tch::Kind::Float).backward();
    /// opt.step(1e-4);
    /// ```
    pub fn new(params: Vec<Tensor>, beta1: f64, beta2: f64, weight_decay: f64) -> Self {
        let exp_avg = params.iter().map(|p| p.zeros_like()).collect();
        Self {
            params,
            exp_avg,
            step: 0,
            beta1,
            beta2,
            weight_decay,
        }
    }
}

impl PerParam for Lion {
    /// One update at learning rate `lr`.
    fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2, wd) = (self.beta1, self.beta2, self.weight_decay);
        tch::no_grad(|| {
            for (p, m) in self.params.iter().zip(&mut self.exp_avg) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                let _ = p.g_mul_scalar_(1.0 - lr * wd);
                let update = (&*m * b1 + &g * (1.0 - b1)).sign();
                let _ = p.g_add_(&(update * -lr));
                let _ = m.g_mul_scalar_(b2).g_add_(&(&g * (1.0 - b2)));
            }
        });
    }
    fn steps_taken(&self) -> u64 {
        self.step
    }
    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        (self.exp_avg.iter().enumerate())
            .map(|(i, m)| (format!("{prefix}.{i}.m"), m.to_device(tch::Device::Cpu)))
            .collect()
    }
    fn load_state(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        for (i, (m, p)) in self.exp_avg.iter_mut().zip(&self.params).enumerate() {
            let name = format!("{prefix}.{i}.m");
            *m = get(&name).ok_or(name)?.to_device(p.device());
        }
        self.step = steps;
        Ok(())
    }
}
