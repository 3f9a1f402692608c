//! kohya's LoRA / LoCon branch (`networks.lora`, `kohya-format.md` §3):
//! `up(drop(down(x))) · multiplier · alpha / rank` with neuron, rank and
//! module dropout (see `crate::dropout`), for [`LoraAdapter::delta`].

use crate::adapter::LoraAdapter;
use crate::dropout::keep_mask;
use crate::geometry::{layer_op, Geometry};
use tch::Tensor;

impl LoraAdapter {
    /// The branch of a `down` / `up` pair (see [`LoraAdapter::delta`]).
    /// Neuron and rank dropout masks are drawn for the global batch and
    /// sliced to this process's rows (`crate::dropout::keep_mask`).
    pub(crate) fn pair_delta(&self, down: &Tensor, up: &Tensor, x: &Tensor, train: bool) -> Tensor {
        let d = self.dropouts();
        let in_kind = x.kind();
        let xk = if in_kind == down.kind() {
            x.shallow_clone()
        } else {
            x.to_kind(down.kind())
        };
        let mut scale = self.scale() * self.multiplier();
        let mut h = layer_op(self.geometry(), &xk, down);
        let rows = self.batch_rows();
        if train && d.dropout > 0.0 {
            // inverted dropout, as torch's: kept activations × 1 / (1 − p)
            let mask = keep_mask(&h.size(), d.dropout, rows, h.kind(), h.device());
            h = h * mask * (1.0 / (1.0 - d.dropout));
        }
        if train && d.rank_dropout > 0.0 {
            let r = self.rank();
            let b = h.size()[0];
            let mask = keep_mask(&[b, r], d.rank_dropout, rows, h.kind(), h.device());
            let mask = match self.geometry() {
                Geometry::Linear => {
                    let mut shape = vec![b];
                    shape.extend(std::iter::repeat_n(1, h.dim().saturating_sub(2)));
                    shape.push(r);
                    mask.view(shape.as_slice())
                }
                Geometry::Conv2d { .. } => mask.view([b, r, 1, 1]),
            };
            h *= mask;
            scale /= 1.0 - d.rank_dropout;
        }
        let out = match self.geometry() {
            Geometry::Linear => h.linear::<&Tensor>(up, None),
            Geometry::Conv2d { .. } => h.conv2d::<&Tensor>(up, None, [1, 1], [0, 0], [1, 1], 1),
        };
        // alpha = rank at strength 1 (a common setup) needs no scaling op.
        let out = if scale == 1.0 { out } else { out * scale };
        if out.kind() == in_kind {
            out
        } else {
            out.to_kind(in_kind)
        }
    }
}
