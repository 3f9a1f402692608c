//! The optimizers, over raw tensors and without host synchronisation:
//!
//! | `train.optimizer` | reference | file |
//! |---|---|---|
//! | `adamw`, `adamw8bit` | `torch.optim.AdamW`, bitsandbytes `AdamW8bit` | [`adamw`], [`quant8`] |
//! | `lion` | `lion_pytorch.Lion` (kohya's `Lion`) | [`lion`] |
//! | `prodigy` | `prodigyopt.Prodigy` 1.1 | [`prodigy`] |
//! | `adafactor` | `transformers.optimization.Adafactor` | [`adafactor`] |
//!
//! [`Optimizer`] is what the trainer drives: one object over the parameter
//! groups (UNet, text encoders), built by [`OptimizerArgs::build`] from the
//! plan's parsed arguments (`train::plan`). Gradient
//! clipping and clearing go through the C++ shim.

pub mod adafactor;
pub mod adamw;
mod args;
mod counts;
pub mod lion;
pub mod prodigy;
pub mod quant8;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::AdamW;
pub use args::{default_weight_decay, OptimizerArgs};
pub use lion::Lion;
pub use prodigy::{Prodigy, ProdigyConfig};
pub use quant8::{dynamic_map, QuantMap, Quantized, BLOCK_SIZE, MIN_8BIT_SIZE};

/// What the trainer drives: one optimizer over named parameter groups.
pub trait Optimizer: std::fmt::Debug {
    /// One update; `lrs[g]` is group `g`'s (scheduled) learning rate.
    /// Parameters without a gradient are skipped. (The caller drops the
    /// gradients afterwards, for all groups at once: [`clear_grads`].)
    fn step(&mut self, lrs: &[f64]);
    /// Updates taken so far.
    fn steps_taken(&self) -> u64;
    /// The state as named CPU tensors (names are the optimizer's own). On
    /// the CPU they share the live buffers: serialise them before the next
    /// step.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Restores a state written by [`Self::state_tensors`]; `get` looks a
    /// name up. Returns the first missing name as the error.
    fn load_state(
        &mut self,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String>;
    /// The family written to the state (`adamw` for both AdamW variants,
    /// which convert into each other on resume).
    fn family(&self) -> &'static str;
}

/// An optimizer whose groups do not interact (AdamW, Lion, Adafactor): one
/// instance per group, its state under `{family}.{group}`.
pub trait PerParam: std::fmt::Debug {
    /// One update at `lr`.
    fn step(&mut self, lr: f64);
    /// Updates taken so far.
    fn steps_taken(&self) -> u64;
    /// The state under `prefix`.
    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)>;
    /// Restores the state under `prefix`.
    fn load_state(
        &mut self,
        prefix: &str,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String>;
}

/// Named groups of a [`PerParam`] optimizer.
#[derive(Debug)]
pub struct Groups<T> {
    family: &'static str,
    groups: Vec<(String, T)>,
}

impl<T: PerParam> Groups<T> {
    /// `groups` are `(name, optimizer)` pairs, stepped in order.
    pub fn new(family: &'static str, groups: Vec<(String, T)>) -> Self {
        Self { family, groups }
    }
}

impl<T: PerParam> Optimizer for Groups<T> {
    fn step(&mut self, lrs: &[f64]) {
        for ((_, o), lr) in self.groups.iter_mut().zip(lrs) {
            o.step(*lr);
        }
    }
    fn steps_taken(&self) -> u64 {
        self.groups.first().map_or(0, |(_, o)| o.steps_taken())
    }
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let family = self.family;
        (self.groups.iter())
            .flat_map(|(name, o)| o.state_tensors(&format!("{family}.{name}")))
            .collect()
    }
    fn load_state(
        &mut self,
        get: &dyn Fn(&str) -> Option<Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        let family = self.family;
        for (name, o) in &mut self.groups {
            o.load_state(&format!("{family}.{name}"), get, steps)?;
        }
        Ok(())
    }
    fn family(&self) -> &'static str {
        self.family
    }
}

use tch::{Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn lorakit_clip_grad_norm(
        params: *mut *mut C_tensor,
        n: i64,
        max_norm: f64,
        total: *mut *mut C_tensor,
    ) -> *mut std::ffi::c_char;
    fn lorakit_clear_grads(params: *mut *mut C_tensor, n: i64);
    fn lorakit_free(p: *mut std::ffi::c_char);
}

pub(crate) fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

/// Turns a shim error message into a panic with it (these calls only fail on
/// programming errors such as mismatched devices).
pub(crate) fn check(err: *mut std::ffi::c_char, what: &str) {
    if !err.is_null() {
        // SAFETY: the shim returns a malloc'ed C string or null.
        let msg = unsafe { std::ffi::CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { lorakit_free(err) };
        panic!("{what}: {msg}");
    }
}

/// Drops the gradients of `params` (`grad = None`): the next backward writes
/// fresh ones instead of accumulating into zeroed buffers.
pub fn clear_grads(params: &[Tensor]) {
    let mut ps: Vec<*mut C_tensor> = params.iter().map(ptr).collect();
    // SAFETY: live tensors borrowed for the call.
    unsafe { lorakit_clear_grads(ps.as_mut_ptr(), ps.len() as i64) };
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
