//! AdamW over raw tensors (decoupled weight decay, as `torch.optim.AdamW`)
//! and its 8-bit variant (bitsandbytes' `AdamW8bit`: blockwise dynamic
//! quantisation of both moments).

use super::counts::StepCounts;
use super::quant8::{QuantMap, Quantized, MIN_8BIT_SIZE};
use super::{check, ptr, PerParam};
use std::collections::BTreeMap;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn lorakit_fused_adamw(
        params: *mut *mut C_tensor,
        exp_avgs: *mut *mut C_tensor,
        exp_avg_sqs: *mut *mut C_tensor,
        n: i64,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut std::ffi::c_char;
}

/// One parameter's moments: fp32, or 8-bit blockwise.
#[derive(Debug)]
enum Moments {
    F32 { m: Tensor, v: Tensor },
    Q8 { m: Quantized, v: Quantized },
}

/// The maps of the two moments (signed for m, unsigned for v), on the device.
#[derive(Debug)]
struct Maps {
    signed: QuantMap,
    unsigned: QuantMap,
}

impl Maps {
    fn new(device: tch::Device) -> Self {
        Self {
            signed: QuantMap::dynamic(true, device),
            unsigned: QuantMap::dynamic(false, device),
        }
    }
}

/// AdamW state for a list of parameters (fp32 moments, or 8-bit moments for
/// parameters of at least [`MIN_8BIT_SIZE`] elements with [`AdamW::new_8bit`]).
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Tensor>,
    moments: Vec<Moments>,
    maps: Option<Maps>,
    step: u64,
    /// Each parameter's own updates (its bias correction's `t`).
    counts: StepCounts,
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
    /// Optimizer over `params` (leaf tensors with `requires_grad`), fp32 moments.
    pub fn new(params: Vec<Tensor>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        Self::build(params, beta1, beta2, eps, weight_decay, false)
    }
    /// The 8-bit variant (bitsandbytes `AdamW8bit`): moments of parameters
    /// with ≥ 4096 elements are kept as blockwise 8-bit codes (¼ of the
    /// memory), smaller ones in fp32.
    pub fn new_8bit(
        params: Vec<Tensor>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        Self::build(params, beta1, beta2, eps, weight_decay, true)
    }
    fn build(
        params: Vec<Tensor>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        eightbit: bool,
    ) -> Self {
        let device = params.first().map_or(tch::Device::Cpu, |p| p.device());
        let moments = params
            .iter()
            .map(|p| {
                if eightbit && p.numel() as i64 >= MIN_8BIT_SIZE {
                    Moments::Q8 {
                        m: Quantized::zeros(&p.size(), p.device()),
                        v: Quantized::zeros(&p.size(), p.device()),
                    }
                } else {
                    Moments::F32 {
                        m: p.zeros_like(),
                        v: p.zeros_like(),
                    }
                }
            })
            .collect();
        Self {
            counts: StepCounts::new(params.len()),
            params,
            moments,
            maps: eightbit.then(|| Maps::new(device)),
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
    /// One update at learning rate `lr`. Parameters without a gradient are
    /// skipped, and their own step counts stay (see [`StepCounts`]). fp32
    /// moments are updated by libtorch's fused AdamW kernel
    /// (`torch.optim.AdamW(fused=True)`), one call per distinct count
    /// (one call unless module dropout skipped some); 8-bit ones per
    /// parameter.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2, eps, wd) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        type Ptrs = (Vec<*mut C_tensor>, Vec<*mut C_tensor>, Vec<*mut C_tensor>);
        let mut fused: BTreeMap<u64, Ptrs> = BTreeMap::new();
        tch::no_grad(|| {
            for (i, (p, moments)) in self.params.iter().zip(&mut self.moments).enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let t = self.counts.advance(i);
                match moments {
                    Moments::F32 { m, v } => {
                        let (fp, fm, fv) = fused.entry(t).or_default();
                        fp.push(ptr(p));
                        fm.push(ptr(m));
                        fv.push(ptr(v));
                    }
                    Moments::Q8 { m, v } => {
                        let maps = self.maps.as_ref().expect("8-bit maps");
                        let bc1 = 1.0 - b1.powi(t as i32);
                        let bc2 = 1.0 - b2.powi(t as i32);
                        let mut mf = maps.signed.dequantize(m);
                        let mut vf = maps.unsigned.dequantize(v);
                        // torch's single-tensor AdamW: in-place updates.
                        let mut p = p.shallow_clone();
                        if wd != 0.0 {
                            let _ = p.g_mul_scalar_(1.0 - lr * wd);
                        }
                        let _ = mf.lerp_(&g, 1.0 - b1);
                        let _ = vf.g_mul_scalar_(b2).addcmul_(&g, &(&g * (1.0 - b2)));
                        if lr != 0.0 {
                            // p -= lr/bc1 · m / (√v/√bc2 + eps), as one addcdiv
                            // with the step size folded into the denominator.
                            let mut denom = vf.sqrt();
                            let _ = denom
                                .g_div_scalar_(bc2.sqrt())
                                .g_add_scalar_(eps)
                                .g_mul_scalar_(-bc1 / lr);
                            let _ = p.addcdiv_(&mf, &denom);
                        }
                        *m = maps.signed.quantize(&mf);
                        *v = maps.unsigned.quantize(&vf);
                    }
                }
            }
        });
        for (t, (mut fp, mut fm, mut fv)) in fused {
            // SAFETY: every pointer is a live tensor owned by `self` for the call.
            let err = unsafe {
                lorakit_fused_adamw(
                    fp.as_mut_ptr(),
                    fm.as_mut_ptr(),
                    fv.as_mut_ptr(),
                    fp.len() as i64,
                    t as f64,
                    lr,
                    b1,
                    b2,
                    wd,
                    eps,
                )
            };
            check(err, "fused AdamW");
        }
    }
    /// The state as named CPU tensors under `prefix`: `{prefix}.{i}.m` /
    /// `.v` (fp32) or `.m_q` / `.m_absmax` / `.v_q` / `.v_absmax` (8-bit).
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        let mut out = Vec::new();
        for (i, mo) in self.moments.iter().enumerate() {
            match mo {
                Moments::F32 { m, v } => {
                    out.push((format!("{prefix}.{i}.m"), cpu(m)));
                    out.push((format!("{prefix}.{i}.v"), cpu(v)));
                }
                Moments::Q8 { m, v } => {
                    out.push((format!("{prefix}.{i}.m_q"), cpu(&m.codes)));
                    out.push((format!("{prefix}.{i}.m_absmax"), cpu(&m.absmax)));
                    out.push((format!("{prefix}.{i}.v_q"), cpu(&v.codes)));
                    out.push((format!("{prefix}.{i}.v_absmax"), cpu(&v.absmax)));
                }
            }
        }
        out.extend(self.counts.state_tensor(prefix, self.step));
        out
    }
    /// Restores a state written by [`Self::state_tensors`] (`get` looks a
    /// name up). A state saved by the other variant is converted (fp32
    /// moments quantised, or 8-bit moments expanded), so switching
    /// `train.optimizer` between adamw and adamw8bit on resume works.
    /// Returns the first missing name as the error.
    pub fn load_state(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        let need = |k: String| get(&k).ok_or(k);
        let had_maps = self.maps.is_some();
        let maps = self.maps.take().unwrap_or_else(|| {
            Maps::new(self.params.first().map_or(tch::Device::Cpu, |p| p.device()))
        });
        let result = (|| -> Result<(), String> {
            for (i, (mo, p)) in self.moments.iter_mut().zip(&self.params).enumerate() {
                let saved_f32 = get(&format!("{prefix}.{i}.m")).is_some();
                let (mf, vf) = if saved_f32 {
                    (
                        need(format!("{prefix}.{i}.m"))?,
                        need(format!("{prefix}.{i}.v"))?,
                    )
                } else {
                    let q = |n: &str| -> Result<Quantized, String> {
                        Ok(Quantized {
                            codes: need(format!("{prefix}.{i}.{n}_q"))?.to_device(p.device()),
                            absmax: need(format!("{prefix}.{i}.{n}_absmax"))?.to_device(p.device()),
                        })
                    };
                    (
                        maps.signed.dequantize(&q("m")?),
                        maps.unsigned.dequantize(&q("v")?),
                    )
                };
                let (mf, vf) = (mf.to_device(p.device()), vf.to_device(p.device()));
                *mo = match mo {
                    Moments::F32 { .. } => Moments::F32 { m: mf, v: vf },
                    Moments::Q8 { .. } if !saved_f32 => {
                        // Keep the exact codes rather than re-quantising.
                        let q = |n: &str| Quantized {
                            codes: get(&format!("{prefix}.{i}.{n}_q"))
                                .expect("checked")
                                .to_device(p.device()),
                            absmax: get(&format!("{prefix}.{i}.{n}_absmax"))
                                .expect("checked")
                                .to_device(p.device()),
                        };
                        Moments::Q8 {
                            m: q("m"),
                            v: q("v"),
                        }
                    }
                    Moments::Q8 { .. } => Moments::Q8 {
                        m: maps.signed.quantize(&mf),
                        v: maps.unsigned.quantize(&vf),
                    },
                };
            }
            Ok(())
        })();
        if had_maps {
            self.maps = Some(maps);
        }
        self.step = steps;
        result?;
        self.counts.load(prefix, get, steps)
    }
}

impl PerParam for AdamW {
    fn step(&mut self, lr: f64) {
        AdamW::step(self, lr)
    }
    fn steps_taken(&self) -> u64 {
        self.step
    }
    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        AdamW::state_tensors(self, prefix)
    }
    fn load_state(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        AdamW::load_state(self, prefix, get, steps)
    }
}
