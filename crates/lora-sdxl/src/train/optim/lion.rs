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
//!
//! `lion8bit` is bitsandbytes' `Lion8bit`: the momentum of a parameter of
//! at least 4096 elements is kept as blockwise dynamic 8-bit codes
//! ([`super::quant8`]), dequantised for the update and quantised again.

use super::quant8::{QuantMap, Quantized, MIN_8BIT_SIZE};
use super::PerParam;
use tch::Tensor;

/// One parameter's momentum: fp32, or 8-bit blockwise.
#[derive(Debug)]
enum Momentum {
    F32(Tensor),
    Q8(Quantized),
}

/// Lion over a list of parameters (one momentum each).
#[derive(Debug)]
pub struct Lion {
    params: Vec<Tensor>,
    exp_avg: Vec<Momentum>,
    /// The signed map of 8-bit momenta ([`Lion::new_8bit`]).
    map: Option<QuantMap>,
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
        Self::build(params, beta1, beta2, weight_decay, false)
    }

    /// The 8-bit variant (bitsandbytes `Lion8bit`): momenta of parameters
    /// with ≥ 4096 elements as blockwise 8-bit codes, smaller ones in fp32.
    pub fn new_8bit(params: Vec<Tensor>, beta1: f64, beta2: f64, weight_decay: f64) -> Self {
        Self::build(params, beta1, beta2, weight_decay, true)
    }

    fn build(
        params: Vec<Tensor>,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eightbit: bool,
    ) -> Self {
        let device = params.first().map_or(tch::Device::Cpu, |p| p.device());
        let exp_avg = (params.iter())
            .map(|p| {
                if eightbit && p.numel() as i64 >= MIN_8BIT_SIZE {
                    Momentum::Q8(Quantized::zeros(&p.size(), p.device()))
                } else {
                    Momentum::F32(p.zeros_like())
                }
            })
            .collect();
        Self {
            params,
            exp_avg,
            map: eightbit.then(|| QuantMap::dynamic(true, device)),
            step: 0,
            beta1,
            beta2,
            weight_decay,
        }
    }
}

/// One Lion update of `p` with momentum `m` (fp32, updated in place), in
/// bitsandbytes' (and lion_pytorch's) order.
fn update(p: &Tensor, m: &mut Tensor, g: &Tensor, lr: f64, (b1, b2, wd): (f64, f64, f64)) {
    let mut p = p.shallow_clone();
    if wd != 0.0 {
        let _ = p.g_mul_scalar_(1.0 - lr * wd);
    }
    let direction = (&*m * b1 + g * (1.0 - b1)).sign();
    let _ = p.g_add_(&(direction * -lr));
    let _ = m.g_mul_scalar_(b2).g_add_(&(g * (1.0 - b2)));
}

impl PerParam for Lion {
    /// One update at learning rate `lr`.
    fn step(&mut self, lr: f64) {
        self.step += 1;
        let hyper = (self.beta1, self.beta2, self.weight_decay);
        tch::no_grad(|| {
            for (p, m) in self.params.iter().zip(&mut self.exp_avg) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                match (m, &self.map) {
                    (Momentum::F32(m), _) => update(p, m, &g, lr, hyper),
                    (Momentum::Q8(q), Some(map)) => {
                        let mut m = map.dequantize(q);
                        update(p, &mut m, &g, lr, hyper);
                        *q = map.quantize(&m);
                    }
                    (Momentum::Q8(_), None) => unreachable!("8-bit momenta come with their map"),
                }
            }
        });
    }
    fn steps_taken(&self) -> u64 {
        self.step
    }
    /// `{prefix}.{i}.m` (fp32) or `.m_q` / `.m_absmax` (8-bit).
    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        let mut out = Vec::new();
        for (i, m) in self.exp_avg.iter().enumerate() {
            match m {
                Momentum::F32(m) => out.push((format!("{prefix}.{i}.m"), cpu(m))),
                Momentum::Q8(q) => {
                    out.push((format!("{prefix}.{i}.m_q"), cpu(&q.codes)));
                    out.push((format!("{prefix}.{i}.m_absmax"), cpu(&q.absmax)));
                }
            }
        }
        out
    }
    /// Restores [`PerParam::state_tensors`]; a state of the other variant
    /// (lion ↔ lion8bit) is converted.
    fn load_state(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        let need = |k: String| get(&k).ok_or(k);
        let device = self.params.first().map_or(tch::Device::Cpu, |p| p.device());
        let signed = || QuantMap::dynamic(true, device);
        for (i, (m, p)) in self.exp_avg.iter_mut().zip(&self.params).enumerate() {
            let d = p.device();
            let saved = match get(&format!("{prefix}.{i}.m")) {
                Some(f) => Momentum::F32(f.to_device(d)),
                None => Momentum::Q8(Quantized {
                    codes: need(format!("{prefix}.{i}.m_q"))?.to_device(d),
                    absmax: need(format!("{prefix}.{i}.m_absmax"))?.to_device(d),
                }),
            };
            *m = match (&*m, saved) {
                (Momentum::F32(_), Momentum::Q8(q)) => Momentum::F32(signed().dequantize(&q)),
                (Momentum::Q8(_), Momentum::F32(f)) => Momentum::Q8(signed().quantize(&f)),
                (_, same) => same,
            };
        }
        self.step = steps;
        Ok(())
    }
}
