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

// dora.rs and adapter.rs use each other on purpose: DoRA is a mode of a
// LoraAdapter (its forward is added here, beside DoRA's maths), and
// LoraAdapter's merge calls `decomposed`, the one definition of W'.
use crate::adapter::LoraAdapter;
use crate::error::Result;
use crate::geometry::layer_op;
use tch::{Kind, Tensor};

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
/// LyCORIS adds it), in fp32.
pub fn decomposed(w: &Tensor, delta: &Tensor, magnitude: &Tensor) -> Tensor {
    let merged = (w + delta).to_kind(Kind::Float);
    let norm = if magnitude.size().first() == Some(&1) && w.size()[0] != 1 {
        input_norm(&merged)
    } else {
        output_norm(&merged)
    };
    &merged * (magnitude / (norm + f64::from(f32::EPSILON)))
}

/// DoRA on any adapter (LoRA, LoHa, LoKr).
impl LoraAdapter {
    /// The adapter branch for a layer whose weight is `base`: [`Self::delta`],
    /// or with DoRA the layer's op with `multiplier · (W' − W)`, the
    /// decomposed weight minus the base (this module).
    pub fn delta_with_base(&self, x: &Tensor, base: &Tensor, train: bool) -> Option<Tensor> {
        let Some(magnitude) = &self.dora else {
            return self.delta(x, train);
        };
        if self.left_out(train) {
            return None;
        }
        let w = base.to_kind(Kind::Float);
        let d =
            (decomposed(&w, &self.delta_weight().view_as(&w), magnitude) - &w) * self.multiplier();
        let out = layer_op(self.geometry(), x, &d.to_kind(x.kind()));
        Some(out)
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
