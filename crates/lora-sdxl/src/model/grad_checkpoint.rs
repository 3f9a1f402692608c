//! Gradient checkpointing through lorakit's C++ shim (csrc/shim.cpp): the
//! forward of a block runs without keeping activations and is recomputed in
//! backward, trading compute (one extra forward of each checkpointed block)
//! for memory — what `gradient_checkpointing = true` does in kohya/AI Toolkit.
//! The RNG state is restored for the recomputation, so LoRA dropouts draw
//! the same masks in both runs.

use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

type RawFn = extern "C" fn(*mut c_void, *mut *mut C_tensor, i64, *mut *mut C_tensor) -> c_int;

extern "C" {
    fn lorakit_checkpoint(
        f: RawFn,
        data: *mut c_void,
        inputs: *mut *mut C_tensor,
        n: i64,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn lorakit_free(p: *mut c_char);
}

/// A computation a checkpoint can run again: tensors in, one tensor out.
pub trait Recompute {
    /// The forward; must be deterministic given the inputs and the RNG state.
    fn run(&self, inputs: &[Tensor]) -> Tensor;
}

extern "C" fn trampoline<R: Recompute>(
    data: *mut c_void,
    inputs: *mut *mut C_tensor,
    n: i64,
    out: *mut *mut C_tensor,
) -> c_int {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `data` is the `&R` given to `checkpoint`, which the caller
        // keeps alive until backward ran (see `checkpoint`); `inputs` are
        // `n` valid tensors owned by the C++ side for this call.
        let r = unsafe { &*(data as *const R) };
        let ins: Vec<Tensor> = (0..n as usize)
            .map(|i| unsafe { Tensor::clone_from_ptr(*inputs.add(i)) })
            .collect();
        r.run(&ins)
    }));
    match result {
        Ok(mut t) => {
            // Ownership of the at::Tensor passes to the C++ side.
            unsafe { *out = t.as_mut_ptr() };
            std::mem::forget(t);
            0
        }
        Err(e) => {
            let msg = lora_core::error::panic_message(&*e);
            tracing::error!("checkpointed block failed: {msg}");
            1
        }
    }
}

/// `r.run(inputs)`, checkpointed when gradients are on. Parameters used
/// inside `r` get their gradients during the recomputation in backward.
///
/// `r` must stay alive (and unchanged) until the backward pass through the
/// result has run or the graph is dropped: use it with model blocks that live
/// as long as the model, as lorakit's UNet does. At least one input should
/// require grad for the recomputation to be part of the graph (the UNet
/// passes an always-requires-grad anchor).
pub fn checkpoint<R: Recompute>(r: &R, inputs: &[&Tensor]) -> Result<Tensor, String> {
    let mut ptrs: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: pointers are valid for the call; the shim copies what it keeps.
    let err = unsafe {
        lorakit_checkpoint(
            trampoline::<R>,
            r as *const R as *mut c_void,
            ptrs.as_mut_ptr(),
            ptrs.len() as i64,
            &mut out,
        )
    };
    if !err.is_null() {
        let msg = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { lorakit_free(err) };
        return Err(msg);
    }
    // SAFETY: the shim handed us an owned `new at::Tensor`.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// A model's gradient-checkpointing switch: whether its blocks run through
/// [`checkpoint`], and the scalar leaf (the anchor) passed to every
/// checkpointed block so the recomputation is part of the graph even when no
/// other input requires grad (frozen base, LoRA parameters inside the block).
#[derive(Debug, Default)]
pub(crate) struct Checkpointing {
    on: std::cell::Cell<bool>,
    anchor: std::cell::RefCell<Option<Tensor>>,
}

impl Checkpointing {
    pub(crate) fn set(&self, on: bool) {
        self.on.set(on);
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.get()
    }

    /// `r.run(inputs)` through [`checkpoint`] with the anchor appended.
    /// `what` names the block in the (internal) error.
    pub(crate) fn run<R: Recompute>(&self, r: &R, inputs: &[&Tensor], what: &str) -> Tensor {
        let mut anchor = self.anchor.borrow_mut();
        let anchor = anchor.get_or_insert_with(|| {
            let device = inputs.first().map_or(tch::Device::Cpu, |t| t.device());
            Tensor::zeros([], (tch::Kind::Float, device)).set_requires_grad(true)
        });
        let mut all: Vec<&Tensor> = Vec::with_capacity(inputs.len() + 1);
        all.extend_from_slice(inputs);
        all.push(anchor);
        checkpoint(r, &all).unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    struct Mlp {
        w1: Tensor,
        w2: Tensor,
        drop: bool,
    }

    impl Recompute for Mlp {
        fn run(&self, i: &[Tensor]) -> Tensor {
            let h = i[0].matmul(&self.w1).gelu("none");
            let h = if self.drop { h.dropout(0.5, true) } else { h };
            h.matmul(&self.w2) * &i[1]
        }
    }

    fn grads(ckpt: bool, drop: bool) -> (Tensor, Tensor, Tensor, Tensor) {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let m = Mlp {
            w1: Tensor::randn([8, 16], opts).set_requires_grad(true),
            w2: Tensor::randn([16, 4], opts).set_requires_grad(true),
            drop,
        };
        let x = Tensor::randn([5, 8], opts).set_requires_grad(true);
        let s = Tensor::randn([1, 4], opts);
        tch::manual_seed(99);
        let y = if ckpt {
            checkpoint(&m, &[&x, &s]).unwrap()
        } else {
            m.run(&[x.shallow_clone(), s.shallow_clone()])
        };
        // Draw something between forward and backward: the recomputation
        // must still see the forward's RNG state.
        let _ = Tensor::randn([3], opts);
        y.square().sum(Kind::Float).backward();
        (y.detach(), m.w1.grad(), m.w2.grad(), x.grad())
    }

    #[test]
    fn same_values_and_gradients_as_without() {
        for drop in [false, true] {
            let a = grads(false, drop);
            let b = grads(true, drop);
            // The recomputation runs the same operations on the same values
            // (and the same dropout mask) in one process: the same bits.
            for (n, (p, q)) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2), (&a.3, &b.3)]
                .into_iter()
                .enumerate()
            {
                let d = (p - q).abs().max().double_value(&[]);
                assert!(p.equal(q), "dropout {drop}, tensor {n}: {d}");
            }
        }
    }

    #[test]
    fn plain_call_without_grad_and_errors_are_reported() {
        let m = Mlp {
            w1: Tensor::ones([2, 2], (Kind::Float, Device::Cpu)),
            w2: Tensor::ones([2, 2], (Kind::Float, Device::Cpu)),
            drop: false,
        };
        let x = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| checkpoint(&m, &[&x, &x]).unwrap());
        assert_eq!(y.size(), vec![1, 2]);
        // A shape error inside the block comes back as an error, not a crash.
        let bad = Tensor::ones([1, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(checkpoint(&m, &[&bad, &x]).is_err());
    }
}
