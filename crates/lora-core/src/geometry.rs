//! The base layer an adapter wraps (Linear or Conv2d, with the conv's
//! stride, padding and dilation) and the layer's own op. Its own file:
//! kohya pairs (`adapter.rs`), LyCORIS' LoHa / LoKr (`lycoris.rs`) and DoRA
//! (`dora.rs`) all use it, and none of them needs another for it.

use tch::Tensor;

/// The kind of base layer an adapter wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    /// A `Linear` layer (also used for `proj_in`/`proj_out` in SDXL).
    Linear,
    /// A `Conv2d` layer; the down projection reuses the base conv's
    /// kernel, stride, padding and dilation, the up projection is 1x1.
    Conv2d {
        /// `[kh, kw]`.
        kernel: [i64; 2],
        /// Base conv stride.
        stride: [i64; 2],
        /// Base conv padding.
        padding: [i64; 2],
        /// Base conv dilation.
        dilation: [i64; 2],
    },
}

impl Geometry {
    /// A conv geometry with stride 1, "same" padding and dilation 1.
    pub fn conv(kh: i64, kw: i64) -> Self {
        Geometry::Conv2d {
            kernel: [kh, kw],
            stride: [1, 1],
            padding: [kh / 2, kw / 2],
            dilation: [1, 1],
        }
    }

    /// True for convolutions whose kernel is not 1x1 (these use the conv rank in LoCon).
    pub fn is_spatial_conv(&self) -> bool {
        matches!(self, Geometry::Conv2d { kernel, .. } if *kernel != [1, 1])
    }
}

/// The base layer's op with weight `w` and no bias: `x Wᵀ`, or the conv
/// with the layer's stride, padding and dilation.
///
/// ```
/// use lora_core::geometry::{layer_op, Geometry};
/// use tch::{Device, Kind, Tensor};
/// let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
/// let w = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
/// assert_eq!(layer_op(Geometry::Linear, &x, &w).size(), [2, 4]);
/// ```
pub fn layer_op(geometry: Geometry, x: &Tensor, w: &Tensor) -> Tensor {
    match geometry {
        Geometry::Linear => x.linear::<&Tensor>(w, None),
        Geometry::Conv2d {
            stride,
            padding,
            dilation,
            ..
        } => x.conv2d::<&Tensor>(w, None, stride, padding, dilation, 1),
    }
}
