//! Basic layers built from a [`VarBuilder`], with LoRA slots on the Linear and
//! Conv2d layers kohya adapts.

use crate::model::weights::VarBuilder;
use lora_core::{Geometry, LoraAdapter, ModuleKey};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use tch::{Kind, Tensor};

/// The adapters attached to one layer (several LoRAs may be applied at once,
/// each at its own strength; training uses one), the model-wide training
/// switch that enables their dropouts, and the model-wide switch that turns
/// every adapter off without detaching it.
#[derive(Debug, Clone)]
pub struct Slot {
    adapters: Rc<RefCell<Vec<LoraAdapter>>>,
    training: Rc<Cell<bool>>,
    off: Rc<Cell<bool>>,
}

impl Slot {
    /// Attaches an adapter.
    pub fn push(&self, a: LoraAdapter) {
        self.adapters.borrow_mut().push(a);
    }
    /// Detaches every adapter.
    pub fn clear(&self) {
        self.adapters.borrow_mut().clear();
    }
    /// The attached adapters.
    pub fn adapters(&self) -> std::cell::Ref<'_, Vec<LoraAdapter>> {
        self.adapters.borrow()
    }
}

/// What a slot adapts: the base layer's geometry and sizes.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// The adapters.
    pub slot: Slot,
    /// Linear or conv (with the base conv's stride/padding).
    pub geometry: Geometry,
    /// Input features/channels of the base layer.
    pub in_features: i64,
    /// Output features/channels of the base layer.
    pub out_features: i64,
    /// The base layer's weight (DoRA starts from its norm).
    pub weight: Rc<Tensor>,
}

/// Every LoRA slot of a model, by module key.
#[derive(Debug, Default, Clone)]
pub struct Slots {
    map: Rc<RefCell<BTreeMap<ModuleKey, SlotInfo>>>,
    training: Rc<Cell<bool>>,
    off: Rc<Cell<bool>>,
}

impl Slots {
    /// Registers a slot.
    pub fn register(&self, key: ModuleKey, geometry: Geometry, weight: &Tensor) -> Slot {
        let (out_features, in_features) = (weight.size()[0], weight.size()[1]);
        let slot = Slot {
            adapters: Rc::new(RefCell::new(Vec::new())),
            training: self.training.clone(),
            off: self.off.clone(),
        };
        let info = SlotInfo {
            slot: slot.clone(),
            geometry,
            in_features,
            out_features,
            weight: Rc::new(weight.shallow_clone()),
        };
        self.map.borrow_mut().insert(key, info);
        slot
    }
    /// The slot of a module.
    pub fn get(&self, key: &ModuleKey) -> Option<SlotInfo> {
        self.map.borrow().get(key).cloned()
    }
    /// Module keys with a slot.
    pub fn keys(&self) -> Vec<ModuleKey> {
        self.map.borrow().keys().cloned().collect()
    }
    /// Number of slots.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
    /// Removes every attached adapter.
    pub fn clear(&self) {
        for info in self.map.borrow().values() {
            info.slot.clear();
        }
    }
    /// Sets the strength of every attached adapter (e.g. to sample a LoRA
    /// under training at the strength users will load it with).
    pub fn set_multiplier(&self, m: f64) {
        for info in self.map.borrow().values() {
            for a in info.slot.adapters.borrow_mut().iter_mut() {
                a.set_multiplier(m);
            }
        }
    }
    /// Training mode: adapters apply their dropouts (kohya semantics).
    pub fn set_training(&self, on: bool) {
        self.training.set(on);
    }
    /// Whether training mode is on.
    pub fn training(&self) -> bool {
        self.training.get()
    }
    /// Runs `f` with training mode off (no dropouts), then restores the mode
    /// it had: for validation and samples in the middle of training.
    pub fn in_eval<T>(&self, f: impl FnOnce() -> T) -> T {
        let was = self.training();
        self.set_training(false);
        let out = f();
        self.set_training(was);
        out
    }
    /// Runs `f` with every attached adapter switched off — the base model's
    /// output, at the cost of one flag read per adapted layer: nothing is
    /// detached, copied or re-attached (output preservation's prior pass).
    /// The switch comes back on afterwards, also when `f` panics, and a
    /// gradient checkpoint recomputed later (in backward) sees it on again:
    /// use it for passes without gradients.
    pub fn without_network<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore<'a>(&'a Cell<bool>, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let _restore = Restore(&self.off, self.off.replace(true));
        f()
    }
    /// Whether the adapters are switched off (inside [`Self::without_network`]).
    pub fn network_off(&self) -> bool {
        self.off.get()
    }
}

// Out-of-place adds keep autograd graphs simple when training through slots.
#[allow(clippy::assign_op_pattern)]
fn apply_slot(slot: &Option<Slot>, x: &Tensor, base: Tensor, weight: &Tensor) -> Tensor {
    let Some(slot) = slot else { return base };
    if slot.off.get() {
        return base;
    }
    let adapters = slot.adapters.borrow();
    let train = slot.training.get();
    let mut out = base;
    for a in adapters.iter() {
        if let Some(d) = a.delta_with_base(x, weight, train) {
            out = out + d.to_kind(x.kind());
        }
    }
    out
}

/// `y = x Wᵀ + b`, optionally adapted.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    slot: Option<Slot>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias`) under `vb`.
    pub fn new(vb: &VarBuilder, in_f: i64, out_f: i64, bias: bool) -> Self {
        Self {
            weight: vb.get("weight", &[out_f, in_f]),
            bias: bias.then(|| vb.get("bias", &[out_f])),
            slot: None,
        }
    }
    /// A layer from tensors already loaded (e.g. a slice of a fused weight).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            slot: None,
        }
    }
    /// Gives the layer a LoRA slot registered under `key`.
    pub fn with_slot(mut self, slots: &Slots, key: ModuleKey) -> Self {
        self.slot = Some(slots.register(key, Geometry::Linear, &self.weight));
        self
    }
    /// Forward.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.linear(&self.weight, self.bias.as_ref());
        apply_slot(&self.slot, x, base, &self.weight)
    }
}

/// 2-D convolution, optionally adapted.
#[derive(Debug)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
    /// Stride.
    pub stride: i64,
    /// Padding.
    pub padding: i64,
    slot: Option<Slot>,
}

impl Conv2d {
    /// Loads a conv with bias.
    pub fn new(vb: &VarBuilder, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Self {
        Self {
            weight: vb.get("weight", &[cout, cin, k, k]),
            bias: vb.get("bias", &[cout]),
            stride,
            padding,
            slot: None,
        }
    }
    /// Gives the layer a LoRA slot registered under `key`.
    pub fn with_slot(mut self, slots: &Slots, key: ModuleKey) -> Self {
        let s = self.weight.size();
        let geometry = Geometry::Conv2d {
            kernel: [s[2], s[3]],
            stride: [self.stride, self.stride],
            padding: [self.padding, self.padding],
            dilation: [1, 1],
        };
        self.slot = Some(slots.register(key, geometry, &self.weight));
        self
    }
    /// Forward.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = [self.stride, self.stride];
        let p = [self.padding, self.padding];
        let base = x.conv2d(&self.weight, Some(&self.bias), s, p, [1, 1], 1);
        apply_slot(&self.slot, x, base, &self.weight)
    }
}

/// GroupNorm computed in fp32 (weights kept in fp32).
#[derive(Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    /// Loads a GroupNorm over `channels`.
    pub fn new(vb: &VarBuilder, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: vb.get_kind("weight", &[channels], Kind::Float),
            bias: vb.get_kind("bias", &[channels], Kind::Float),
            groups,
            eps,
        }
    }
    /// Forward (returns the input dtype).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.to_kind(Kind::Float)
            .group_norm(
                self.groups,
                Some(&self.weight),
                Some(&self.bias),
                self.eps,
                true,
            )
            .to_kind(k)
    }
}

/// LayerNorm over the last dimension, computed in fp32.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    /// Loads a LayerNorm over `dim`.
    pub fn new(vb: &VarBuilder, dim: i64, eps: f64) -> Self {
        Self {
            weight: vb.get_kind("weight", &[dim], Kind::Float),
            bias: vb.get_kind("bias", &[dim], Kind::Float),
            dim,
            eps,
        }
    }
    /// Forward (returns the input dtype).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        x.to_kind(Kind::Float)
            .layer_norm(
                [self.dim],
                Some(&self.weight),
                Some(&self.bias),
                self.eps,
                true,
            )
            .to_kind(k)
    }
}

/// Sinusoidal embedding of scalars (timesteps, SDXL size ids): `[cos, sin]`,
/// frequencies `exp(−ln(10000)·i/half)`, computed in fp32.
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(-1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], -1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_eval_turns_training_off_and_restores_it() {
        let s = Slots::default();
        s.set_training(true);
        assert!(!s.in_eval(|| s.training()));
        assert!(
            s.training(),
            "training mode must come back after a validation"
        );
        s.set_training(false);
        s.in_eval(|| ());
        assert!(!s.training());
    }

    #[test]
    fn without_network_switches_adapters_off_and_back_on() {
        let s = Slots::default();
        assert!(!s.network_off());
        assert!(s.without_network(|| s.network_off()));
        assert!(!s.network_off(), "the network must come back on");
        // nested: the inner call restores the outer state
        s.without_network(|| {
            s.without_network(|| ());
            assert!(s.network_off());
        });
        // and after a panic inside
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.without_network(|| panic!("boom"))
        }));
        assert!(r.is_err());
        assert!(!s.network_off());
    }
}
