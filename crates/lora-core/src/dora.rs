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
