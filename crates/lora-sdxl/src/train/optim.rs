//! AdamW over raw tensors (decoupled weight decay, as `torch.optim.AdamW`),
//! its 8-bit variant (bitsandbytes' `AdamW8bit`: blockwise dynamic
//! quantisation of both moments), and gradient-norm clipping, all without
//! host synchronisation.

use tch::{Kind, Tensor};
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
    fn lorakit_clip_grad_norm(
        params: *mut *mut C_tensor,
        n: i64,
        max_norm: f64,
        total: *mut *mut C_tensor,
    ) -> *mut std::ffi::c_char;
    fn lorakit_clear_grads(params: *mut *mut C_tensor, n: i64);
    fn lorakit_free(p: *mut std::ffi::c_char);
}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// Turns a shim error message into a panic with it (these calls only fail on
/// programming errors such as mismatched devices).
fn check(err: *mut std::ffi::c_char, what: &str) {
    if !err.is_null() {
        // SAFETY: the shim returns a malloc'ed C string or null.
        let msg = unsafe { std::ffi::CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { lorakit_free(err) };
        panic!("{what}: {msg}");
    }
}

/// bitsandbytes' block size for 8-bit optimizer states.
pub const BLOCK_SIZE: i64 = 256;
/// Parameters smaller than this keep fp32 states (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: i64 = 4096;

/// bitsandbytes' dynamic quantisation map (`create_dynamic_map`, 7 exponent
/// bits, 8 bits): 256 sorted values in [-1, 1] (signed) or [0, 1] (unsigned),
/// dense near zero.
pub fn dynamic_map(signed: bool) -> Tensor {
    let (total_bits, max_exp) = (8i32, 7i32);
    let non_sign = total_bits - 1;
    let additional = 2i64.pow((non_sign - max_exp) as u32) - 1;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    // bitsandbytes multiplies a float32 tensor by a Python float: the product
    // is computed in f32.
    let means = |items: i64| -> Vec<f32> {
        let b = Tensor::linspace(0.1, 1.0, items, (Kind::Float, tch::Device::Cpu));
        let m = (b.narrow(0, 0, items - 1) + b.narrow(0, 1, items - 1)) / 2.0;
        Vec::<f32>::try_from(&m).expect("float tensor")
    };
    let mut last_scale = 1.0f32;
    for i in 0..max_exp {
        let items = if signed {
            2i64.pow((i + non_sign - max_exp) as u32) + 1
        } else {
            2i64.pow((i + non_sign - max_exp + 1) as u32) + 1
        };
        let scale = 10f64.powf(f64::from(-(max_exp - 1) + i)) as f32;
        last_scale = scale;
        for m in means(items) {
            data.push(scale * m);
            if signed {
                data.push(-scale * m);
            }
        }
    }
    if additional > 0 {
        for m in means(additional + 1) {
            data.push(last_scale * m);
            if signed {
                data.push(-last_scale * m);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    // Unsigned maps have fewer items: pad with zeros as bitsandbytes does.
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(f32::total_cmp);
    Tensor::from_slice(&data)
}

/// A tensor stored as 8-bit codes of a quantisation map with one absmax per
/// block of [`BLOCK_SIZE`] elements (of the flattened tensor).
#[derive(Debug)]
pub struct Quantized {
    /// Codes, `uint8`, the tensor's shape.
    pub codes: Tensor,
    /// Absmax per block, fp32.
    pub absmax: Tensor,
}

fn blocks(n: i64) -> i64 {
    (n + BLOCK_SIZE - 1) / BLOCK_SIZE
}

/// Per-element absmax of each element's block (`[n]`).
fn expand_blocks(per_block: &Tensor, n: i64) -> Tensor {
    per_block
        .repeat_interleave_self_int(BLOCK_SIZE, 0, None)
        .narrow(0, 0, n)
}

impl Quantized {
    /// Zeros of `shape` on `device`.
    pub fn zeros(shape: &[i64], device: tch::Device) -> Self {
        let n: i64 = shape.iter().product();
        Self {
            codes: Tensor::zeros(shape, (Kind::Uint8, device)),
            absmax: Tensor::zeros([blocks(n)], (Kind::Float, device)),
        }
    }
}

/// A quantisation map (256 sorted codes) and the midpoints between them.
#[derive(Debug)]
pub struct QuantMap {
    code: Tensor,
    bounds: Tensor,
}

impl QuantMap {
    /// bitsandbytes' dynamic map ([`dynamic_map`]) on `device`.
    pub fn dynamic(signed: bool, device: tch::Device) -> Self {
        let code = dynamic_map(signed).to_device(device);
        let bounds = (code.narrow(0, 0, 255) + code.narrow(0, 1, 255)) / 2.0;
        Self { code, bounds }
    }
    /// Blockwise quantisation (bitsandbytes: scale by 1/absmax, clamp to
    /// [-1, 1], nearest code via the midpoints between codes).
    pub fn quantize(&self, x: &Tensor) -> Quantized {
        let flat = x.to_kind(Kind::Float).reshape([-1]);
        let n = flat.size()[0];
        let nb = blocks(n);
        let padded = flat.constant_pad_nd([0, nb * BLOCK_SIZE - n]);
        let absmax = padded
            .view([nb, BLOCK_SIZE])
            .abs()
            .amax([1].as_slice(), false);
        let inv = absmax.clamp_min(1e-38).reciprocal();
        let scaled = (flat * expand_blocks(&inv, n)).clamp(-1.0, 1.0);
        let codes = scaled
            .bucketize(&self.bounds, true, false)
            .to_kind(Kind::Uint8)
            .view(x.size().as_slice());
        Quantized { codes, absmax }
    }
    /// Back to fp32.
    pub fn dequantize(&self, q: &Quantized) -> Tensor {
        let n = q.codes.numel() as i64;
        let values = self
            .code
            .index_select(0, &q.codes.reshape([-1]).to_kind(Kind::Int64));
        (values * expand_blocks(&q.absmax, n)).view(q.codes.size().as_slice())
    }
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
    /// skipped. fp32 moments are updated by libtorch's fused AdamW kernel in
    /// one call (`torch.optim.AdamW(fused=True)`); 8-bit ones per parameter.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step as i32);
        let bc2 = 1.0 - self.beta2.powi(self.step as i32);
        let (b1, b2, eps, wd) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        let (mut fp, mut fm, mut fv) = (Vec::new(), Vec::new(), Vec::new());
        tch::no_grad(|| {
            for (p, moments) in self.params.iter().zip(&mut self.moments) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                match moments {
                    Moments::F32 { m, v } => {
                        fp.push(ptr(p));
                        fm.push(ptr(m));
                        fv.push(ptr(v));
                    }
                    Moments::Q8 { m, v } => {
                        let maps = self.maps.as_ref().expect("8-bit maps");
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
        if !fp.is_empty() {
            // SAFETY: every pointer is a live tensor owned by `self` for the call.
            let err = unsafe {
                lorakit_fused_adamw(
                    fp.as_mut_ptr(),
                    fm.as_mut_ptr(),
                    fv.as_mut_ptr(),
                    fp.len() as i64,
                    self.step as f64,
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
    /// Drops the parameters' gradients (`grad = None`): the next backward
    /// writes fresh ones instead of accumulating into zeroed buffers.
    pub fn zero_grad(&mut self) {
        let mut ps: Vec<*mut C_tensor> = self.params.iter().map(ptr).collect();
        // SAFETY: live tensors owned by `self`.
        unsafe { lorakit_clear_grads(ps.as_mut_ptr(), ps.len() as i64) };
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
        let result = (|| {
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
        result
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`), returning the norm before clipping as a
/// 0-dim tensor (read it only when you need it: that is a host sync).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Tensor {
    let mut with_grad: Vec<*mut C_tensor> = params
        .iter()
        .filter(|p| p.grad().defined())
        .map(ptr)
        .collect();
    if with_grad.is_empty() {
        return Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    }
    let mut total: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: live tensors for the call; the shim hands back an owned tensor.
    let err = unsafe {
        lorakit_clip_grad_norm(
            with_grad.as_mut_ptr(),
            with_grad.len() as i64,
            max_norm,
            &mut total,
        )
    };
    check(err, "gradient clipping");
    unsafe { Tensor::from_ptr(total) }
}
