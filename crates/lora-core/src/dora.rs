//! DoRA, weight-decomposed low-rank adaptation (LyCORIS' `weight_decompose`,
//! `dora_wd`): the adapted weight keeps the base weight's direction plus the
//! update, rescaled to a learned magnitude `m` (`dora_scale`):
//! `W' = (W + ΔW) · m / ‖W + ΔW‖`.
//!
//! The norm runs over every axis but one. lorakit writes the **input-axis**
//! form (`m` of shape `[1, in(, 1, 1)]`, LyCORIS' `wd_on_out = false`): it
//! is the form ComfyUI and A1111 both apply correctly (the output-axis form
//! `[out, 1(, 1, 1)]`, LyCORIS ≥ 3.2's default, is read too). A strength
//! `s` applies `W + s · (W' − W)`, as the UIs do.
//!
//! **Training forward (input axis), factored** (issue 29): with
//! `d = m / (‖W + ΔW‖ + ε)` per input channel, `W'` is `W + ΔW` with its
//! input channels scaled by `d`, so the branch is
//! `s · (W·((d − 1) ⊙ x) + ΔW·(d ⊙ x))`: one op with the base weight as it
//! is (no copy, no fp32 cast kept for the backward) and the update applied
//! in factored form (`factored.rs`). The norm comes from
//! `‖W_j‖² + 2⟨W_j, ΔW_j⟩ + ‖ΔW_j‖²`, contractions of `W` with the factors,
//! so neither `ΔW` nor `W + ΔW` is formed.
//!
//! **The norm is detached from the autograd graph** (a constant in the
//! backward), as the DoRA paper (§4.3) and peft do; LyCORIS does not detach
//! it. The forward is the same either way (the lycoris-lora fixture tests
//! compare forwards only); the gradients w.r.t. the update's factors lose
//! the term through the norm. Keeping it would make the backward need `W` in
//! fp32 for every adapted layer (the cross term `⟨W_j, ΔW_j⟩`'s derivative
//! is a product with `W`), a full-size copy per layer, which is what this
//! forward exists to avoid. The magnitude `m` and the input still get their
//! full gradients. The output-axis form, which lorakit reads but does not
//! train, and shapes the factored forms do not take, keep the materialised
//! forward (`W'` formed in full, its norm detached too).

// dora.rs and adapter.rs use each other on purpose: DoRA is a mode of a
// LoraAdapter (its forward is added here, beside DoRA's maths), and
// LoraAdapter's merge calls `decomposed`, the one definition of W'.
use crate::adapter::LoraAdapter;
use crate::error::Result;
use crate::factored::{note_materialised, to_acc, Update};
use crate::geometry::{layer_op, Geometry};
use tch::{Kind, Tensor};

/// LyCORIS' ε under the norm: fp32's.
const EPS: f64 = f32::EPSILON as f64;

/// Whether `magnitude` is the input-axis form for a weight of `out` rows.
fn is_input_axis(magnitude: &Tensor, out: i64) -> bool {
    magnitude.size().first() == Some(&1) && out != 1
}

/// `‖W‖` per input channel: `[1, in(, 1, 1)]`.
pub fn input_norm(w: &Tensor) -> Tensor {
    let dims: Vec<i64> = (0..w.dim() as i64).filter(|&d| d != 1).collect();
    w.norm_scalaropt_dim(2, dims.as_slice(), true)
}

/// `‖W‖` per output channel: `[out, 1(, 1, 1)]`.
fn output_norm(w: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..w.dim() as i64).collect();
    w.norm_scalaropt_dim(2, dims.as_slice(), true)
}

/// `W' = (W + ΔW) · m / (‖W + ΔW‖ + ε)` along `m`'s axis (ε: fp32's, as
/// LyCORIS adds it), in fp32 (fp64 for fp64 tensors), the norm detached
/// from autograd (see the module doc).
pub fn decomposed(w: &Tensor, delta: &Tensor, magnitude: &Tensor) -> Tensor {
    note_materialised();
    let merged = to_acc(&(w + delta));
    let norm = if is_input_axis(magnitude, w.size()[0]) {
        input_norm(&merged)
    } else {
        output_norm(&merged)
    };
    &merged * (magnitude / (norm.detach() + EPS))
}

/// DoRA on any adapter (LoRA, LoHa, LoKr).
impl LoraAdapter {
    /// The adapter branch for a layer whose weight is `base`: [`Self::delta`],
    /// or with DoRA the layer's op with `multiplier · (W' − W)`, the
    /// decomposed weight minus the base (this module).
    ///
    /// With an input-axis magnitude the branch is computed in factored form
    /// (module doc), else through the merged weight.
    pub fn delta_with_base(&self, x: &Tensor, base: &Tensor, train: bool) -> Option<Tensor> {
        let Some(magnitude) = &self.dora else {
            return self.delta(x, train);
        };
        if self.left_out(train) {
            return None;
        }
        Some(match self.factored_dora(x, base, magnitude) {
            Some(out) => out,
            None => self.materialised_dora(x, base, magnitude),
        })
    }

    /// [`Self::delta_with_base`] through `W'` formed in full (the forward
    /// before issue 29, with the norm detached): the tests' reference.
    #[cfg(test)]
    pub(crate) fn delta_with_base_materialised(
        &self,
        x: &Tensor,
        base: &Tensor,
        train: bool,
    ) -> Option<Tensor> {
        let Some(magnitude) = &self.dora else {
            return self.delta(x, train);
        };
        if self.left_out(train) {
            return None;
        }
        Some(self.materialised_dora(x, base, magnitude))
    }

    /// `s · (W' − W)` formed in full, then the layer's op with it.
    fn materialised_dora(&self, x: &Tensor, base: &Tensor, magnitude: &Tensor) -> Tensor {
        let w = to_acc(base);
        let dw = self.delta_weight().view_as(&w);
        let d = (decomposed(&w, &dw, magnitude) - &w) * self.multiplier();
        layer_op(self.geometry(), x, &d.to_kind(x.kind()))
    }

    /// `s · (W·((d − 1) ⊙ x) + ΔW·(d ⊙ x))`, `d = m / (‖W + ΔW‖ + ε)` per
    /// input channel (module doc), in `x`'s dtype; `None` for an
    /// output-axis magnitude or shapes the factored forms do not take.
    fn factored_dora(&self, x: &Tensor, base: &Tensor, magnitude: &Tensor) -> Option<Tensor> {
        let fits = is_input_axis(magnitude, base.size()[0])
            && base.size() == self.weight_shape()
            && magnitude.numel() == self.in_features() as usize;
        if !fits {
            return None;
        }
        let update: Update = self.update().filter(|u| u.fits_input(x))?;
        let norm = update.input_norm_of_sum(base);
        let kind = norm.kind();
        let d = magnitude.to_kind(kind).reshape([-1]) / (norm + EPS);
        let s = self.multiplier();
        // (d − 1)·s on the input's channels (the strength folded into the
        // scales: no pass over the output)
        let c = ((&d - 1.0) * s).to_kind(x.kind());
        let c = match self.geometry() {
            Geometry::Linear => c,
            Geometry::Conv2d { .. } => c.reshape([1, -1, 1, 1]),
        };
        // the base weight as the layer holds it: no copy is kept for the backward
        let w = if base.kind() == x.kind() {
            base.shallow_clone()
        } else {
            base.to_kind(x.kind())
        };
        let kept = layer_op(self.geometry(), &(x * c), &w);
        let added = update.apply_scaled(x, Some(&(d * s)));
        Some(kept + added.to_kind(x.kind()))
    }

    /// Turns on DoRA for a layer whose weight is `base`: the magnitude
    /// starts as the base weight's norm per input channel (this module).
    pub fn enable_dora(&mut self, base: &Tensor) -> Result<()> {
        self.check_base(base)?;
        self.dora = Some(input_norm(&base.to_kind(Kind::Float)).detach());
        Ok(())
    }

    /// Sets DoRA's magnitude as a file holds it (`dora_scale`, either axis).
    pub fn set_dora_scale(&mut self, magnitude: Tensor) {
        self.dora = Some(magnitude.to_kind(Kind::Float));
    }

    /// DoRA's magnitude, when the adapter has one.
    pub fn dora_scale(&self) -> Option<&Tensor> {
        self.dora.as_ref()
    }
}
