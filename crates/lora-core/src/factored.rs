//! The training-time forward of an adapter's update `ΔW` without forming
//! `ΔW` (issue 29): the layer op with `ΔW` applied as the thin ops its
//! factors are, and the per-input-channel norm of `W + ΔW` that DoRA needs
//! from contractions of `W` with the factors.
//!
//! Two forms cover every update lorakit trains or reads (all matrices are
//! `[out, in·kh·kw]`, a conv's columns ordered `(channel, kh, kw)`):
//!
//! - **low rank**, `ΔW = s · U·V` (`U [out, R]`, `V [R, in·kh·kw]`): a
//!   kohya LoRA / LoCon pair (`U = up`, `V = down`), and LoHa through its
//!   Khatri–Rao factors: `(W1a·W1b) ⊙ (W2a·W2b) = U·V` with
//!   `U[:, (i,j)] = W1a[:, i] ⊙ W2a[:, j]`, `V[(i,j), :] = W1b[i, :] ⊙ W2b[j, :]`
//!   (`R = r₁·r₂`). The layer becomes `x → V → U`: the layer's own op with `V`
//!   (a conv keeps its kernel, stride, padding and dilation), then a 1×1.
//! - **Kronecker**, `ΔW = s · w1 ⊗ w2` (LoKr: `w1 [l, m]`, `w2 [k, n·kh·kw]`,
//!   full or `w2_a·w2_b`): `(A ⊗ B)·vec(X) = vec(B·X·Aᵀ)`, so the input's
//!   channels are split into `m` groups of `n`, `w2` is applied to each group
//!   (a Linear on the last axis, or the layer's conv with the groups folded
//!   into the batch) and `w1` mixes the groups. A low-rank `w2` is applied
//!   as its two thin ops; `w1` (the small factor, `[l, m]`) is formed.
//!
//! Everything is computed in fp32 (fp64 when the factors are fp64, for the
//! tests' reference), as the materialised path computes `ΔW`.
//!
//! LoHa's conv Tucker form (`hada_t1/t2`) and LoKr's `lokr_t2` are not read
//! by lorakit, so there is nothing to factor for them. Shapes the two forms
//! cannot express (a factor lorakit never writes, e.g. a 4-D `lokr_w2_b`)
//! give `None` here, and the caller keeps the materialised forward.

use crate::adapter::LoraAdapter;
use crate::geometry::{layer_op, Geometry};
use tch::{Kind, Tensor};

/// The kind updates are computed in: fp64 for fp64 tensors (the tests'
/// reference), fp32 for every other kind.
pub(crate) fn accumulation_kind(t: &Tensor) -> Kind {
    if t.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// `t` in [`accumulation_kind`] (no copy when it is already).
pub(crate) fn to_acc(t: &Tensor) -> Tensor {
    let kind = accumulation_kind(t);
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// Counts one full-size `ΔW` formed on this thread (tests only; a no-op
/// otherwise).
pub(crate) fn note_materialised() {
    #[cfg(test)]
    probe::MATERIALISED.with(|c| c.set(c.get() + 1));
}

/// LoKr's large factor `w2`: `[k, n·kh·kw]`, full or `a [k, r]` · `b [r, n·kh·kw]`.
pub(crate) enum Side {
    Full(Tensor),
    Low(Tensor, Tensor),
}

impl Side {
    /// `[rows, cols]` of the factor.
    fn shape(&self) -> (i64, i64) {
        match self {
            Side::Full(w) => (w.size()[0], w.size()[1]),
            Side::Low(a, b) => (a.size()[0], b.size()[1]),
        }
    }
    /// The factor as one matrix (small: `1/(l·m)` of `ΔW`).
    fn matrix(&self) -> Tensor {
        match self {
            Side::Full(w) => w.shallow_clone(),
            Side::Low(a, b) => a.matmul(b),
        }
    }
}

/// The two factored forms (see the module doc).
pub(crate) enum Form {
    /// `U [out, R]`, `V [R, in·kh·kw]`.
    LowRank { u: Tensor, v: Tensor },
    /// `w1 [l, m]`, `w2 [k, n·kh·kw]`.
    Kron { w1: Tensor, w2: Side },
}

/// An update `ΔW = scale · form` of a layer, ready to apply to inputs.
pub(crate) struct Update {
    form: Form,
    scale: f64,
    geometry: Geometry,
    in_features: i64,
    out_features: i64,
}

fn kernel_len(geometry: Geometry) -> i64 {
    match geometry {
        Geometry::Linear => 1,
        Geometry::Conv2d { kernel, .. } => kernel[0] * kernel[1],
    }
}

fn is_matrix(t: &Tensor) -> bool {
    t.dim() == 2
}

impl Update {
    /// `scale · U·V` for a layer of `in_features` inputs, or `None` when the
    /// shapes are not `[out, R]`, `[R, in·kh·kw]`.
    pub(crate) fn low_rank(
        u: Tensor,
        v: Tensor,
        scale: f64,
        geometry: Geometry,
        in_features: i64,
    ) -> Option<Self> {
        let ok = is_matrix(&u)
            && is_matrix(&v)
            && u.size()[1] == v.size()[0]
            && v.size()[1] == in_features * kernel_len(geometry);
        let out_features = u.size()[0];
        ok.then_some(Self {
            form: Form::LowRank { u, v },
            scale,
            geometry,
            in_features,
            out_features,
        })
    }

    /// LoHa's `scale · (w1a·w1b) ⊙ (w2a·w2b)` as its Khatri–Rao low-rank
    /// form (the factors in their accumulation kind), or `None` for shapes
    /// that are not four matrices `[out, r₁]`, `[r₁, cols]`, `[out, r₂]`, `[r₂, cols]`.
    pub(crate) fn loha(
        [w1a, w1b, w2a, w2b]: [&Tensor; 4],
        scale: f64,
        geometry: Geometry,
        in_features: i64,
    ) -> Option<Self> {
        if ![w1a, w1b, w2a, w2b].into_iter().all(is_matrix)
            || w1a.size()[0] != w2a.size()[0]
            || w1b.size()[1] != w2b.size()[1]
        {
            return None;
        }
        let (out, cols) = (w1a.size()[0], w1b.size()[1]);
        let (r1, r2) = (w1a.size()[1], w2a.size()[1]);
        // U[:, i·r₂ + j] = w1a[:, i] ⊙ w2a[:, j]; V[i·r₂ + j, :] = w1b[i, :] ⊙ w2b[j, :]
        let u = (to_acc(w1a).unsqueeze(2) * to_acc(w2a).unsqueeze(1)).reshape([out, r1 * r2]);
        let v = (to_acc(w1b).unsqueeze(1) * to_acc(w2b).unsqueeze(0)).reshape([r1 * r2, cols]);
        Self::low_rank(u, v, scale, geometry, in_features)
    }

    /// LoKr's `scale · w1 ⊗ w2` (`w1 [l, m]`, `w2` full or low rank), or
    /// `None` when `l·k` is not `out_features` or `w2`'s columns are not
    /// whole groups of `n·kh·kw` with `m·n = in_features`.
    pub(crate) fn kron(
        w1: Tensor,
        w2: Side,
        scale: f64,
        geometry: Geometry,
        (in_features, out_features): (i64, i64),
    ) -> Option<Self> {
        let matrices = match &w2 {
            Side::Full(w) => is_matrix(w),
            Side::Low(a, b) => is_matrix(a) && is_matrix(b) && a.size()[1] == b.size()[0],
        };
        if !is_matrix(&w1) || !matrices {
            return None;
        }
        let (l, m) = (w1.size()[0], w1.size()[1]);
        let (k, cols2) = w2.shape();
        let kk = kernel_len(geometry);
        let fits = l * k == out_features && cols2 % kk == 0 && m * (cols2 / kk) == in_features;
        fits.then_some(Self {
            form: Form::Kron { w1, w2 },
            scale,
            geometry,
            in_features,
            out_features,
        })
    }

    /// The kind the update computes in.
    pub(crate) fn kind(&self) -> Kind {
        match &self.form {
            Form::LowRank { u, .. } => u.kind(),
            Form::Kron { w1, .. } => w1.kind(),
        }
    }

    /// Whether [`Self::apply`] takes `x`: `[…, in]` for a Linear, a batched
    /// `[B, in, H, W]` for a conv (other inputs keep the materialised op).
    pub(crate) fn fits_input(&self, x: &Tensor) -> bool {
        let size = x.size();
        match self.geometry {
            Geometry::Linear => size.last() == Some(&self.in_features),
            Geometry::Conv2d { .. } => size.len() == 4 && size[1] == self.in_features,
        }
    }

    /// The layer's op with `ΔW` on `x` (bias-free), never forming `ΔW`, in
    /// [`Self::kind`]. `x` must pass [`Self::fits_input`].
    pub(crate) fn apply(&self, x: &Tensor) -> Tensor {
        self.apply_scaled(x, None)
    }

    /// [`Self::apply`] on `c ⊙ x` for a per-input-channel `c` (`[in]`, in
    /// [`Self::kind`]; DoRA's `d`). The scale and `c` go where they cost
    /// least: into the thin factors of a low-rank update (`U`, and `V`'s
    /// columns), into `w1` and onto the input for a Kronecker one; never a
    /// pass over the output.
    pub(crate) fn apply_scaled(&self, x: &Tensor, c: Option<&Tensor>) -> Tensor {
        let kind = self.kind();
        let x = if x.kind() == kind {
            x.shallow_clone()
        } else {
            x.to_kind(kind)
        };
        match &self.form {
            Form::LowRank { u, v } => {
                let v = match c {
                    Some(c) => {
                        let r = v.size()[0];
                        let per_channel = v.reshape([r, self.in_features, -1]);
                        (per_channel * c.reshape([1, -1, 1])).reshape([r, -1])
                    }
                    None => v.shallow_clone(),
                };
                self.apply_low_rank(&x, &(u * self.scale), &v)
            }
            Form::Kron { w1, w2 } => {
                let x = match (c, self.geometry) {
                    (None, _) => x,
                    (Some(c), Geometry::Linear) => x * c,
                    (Some(c), Geometry::Conv2d { .. }) => x * c.reshape([1, -1, 1, 1]),
                };
                self.apply_kron(&x, &(w1 * self.scale), w2)
            }
        }
    }

    /// `x → V → U`: the layer's op with `V`, then a Linear / 1×1 conv with `U`.
    fn apply_low_rank(&self, x: &Tensor, u: &Tensor, v: &Tensor) -> Tensor {
        match self.geometry {
            Geometry::Linear => x.linear::<&Tensor>(v, None).linear::<&Tensor>(u, None),
            Geometry::Conv2d { kernel, .. } => {
                let r = v.size()[0];
                let down = v.reshape([r, self.in_features, kernel[0], kernel[1]]);
                let h = layer_op(self.geometry, x, &down);
                h.conv2d::<&Tensor>(&u.reshape([-1, r, 1, 1]), None, [1, 1], [0, 0], [1, 1], 1)
            }
        }
    }

    /// `w2` on inputs whose last axis (Linear) or channel axis (conv, `n`
    /// channels) is one group: a Linear, or the layer's conv with `w2`'s
    /// kernel; a low-rank `w2` as its two thin ops.
    fn apply_side(&self, x: &Tensor, w2: &Side, n: i64) -> Tensor {
        let one_by_one = |h: &Tensor, a: &Tensor| {
            h.conv2d::<&Tensor>(
                &a.reshape([a.size()[0], -1, 1, 1]),
                None,
                [1, 1],
                [0, 0],
                [1, 1],
                1,
            )
        };
        match (self.geometry, w2) {
            (Geometry::Linear, Side::Full(w)) => x.linear::<&Tensor>(w, None),
            (Geometry::Linear, Side::Low(a, b)) => {
                x.linear::<&Tensor>(b, None).linear::<&Tensor>(a, None)
            }
            (Geometry::Conv2d { kernel, .. }, Side::Full(w)) => {
                layer_op(self.geometry, x, &w.reshape([-1, n, kernel[0], kernel[1]]))
            }
            (Geometry::Conv2d { kernel, .. }, Side::Low(a, b)) => {
                let h = layer_op(self.geometry, x, &b.reshape([-1, n, kernel[0], kernel[1]]));
                one_by_one(&h, a)
            }
        }
    }

    /// `vec(w2 · X · w1ᵀ)`: the input's channels as `m` groups of `n`, `w2`
    /// within each group, `w1` across the groups.
    fn apply_kron(&self, x: &Tensor, w1: &Tensor, w2: &Side) -> Tensor {
        let m = w1.size()[1];
        let n = self.in_features / m;
        match self.geometry {
            Geometry::Linear => {
                let size = x.size();
                let lead = &size[..size.len() - 1];
                let grouped = x.reshape([lead, &[m, n]].concat().as_slice());
                // [..., m, k] → w1 @ · → [..., l, k]: output channel a·k + b
                let y = w1.matmul(&self.apply_side(&grouped, w2, n));
                y.reshape([lead, &[self.out_features]].concat().as_slice())
            }
            Geometry::Conv2d { .. } => {
                let size = x.size();
                let (batch, h, w) = (size[0], size[2], size[3]);
                let grouped = x.reshape([batch * m, n, h, w]);
                let z = self.apply_side(&grouped, w2, n); // [B·m, k, H', W']
                let zs = z.size();
                let y = w1.matmul(&z.reshape([batch, m, -1])); // [B, l, k·H'·W']
                y.reshape([batch, self.out_features, zs[2], zs[3]])
            }
        }
    }

    /// `‖(W + ΔW)[:, j]‖` per input channel `j` (over the output axis and
    /// the kernel), `[in]`, in [`Self::kind`], outside autograd, from
    /// `‖W[:, c]‖² + 2⟨W[:, c], ΔW[:, c]⟩ + ‖ΔW[:, c]‖²` per matrix column
    /// `c`; `w` is the base weight (its matrix is formed in [`Self::kind`]
    /// for the duration of this call only).
    pub(crate) fn input_norm_of_sum(&self, w: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let kind = self.kind();
            let wm = w.to_kind(kind).reshape([self.out_features, -1]);
            let (cross, square) = match &self.form {
                Form::LowRank { u, v } => {
                    let ut = u.transpose(0, 1);
                    // ⟨W_c, (UV)_c⟩ = Σ_r (UᵀW)[r, c]·V[r, c]; ‖(UV)_c‖² = V_cᵀ(UᵀU)V_c
                    let cross = (ut.matmul(&wm) * v).sum_dim_intlist(0, false, None::<Kind>);
                    let square =
                        (ut.matmul(u).matmul(v) * v).sum_dim_intlist(0, false, None::<Kind>);
                    (cross, square)
                }
                Form::Kron { w1, w2 } => {
                    let (l, m) = (w1.size()[0], w1.size()[1]);
                    let b = w2.matrix();
                    let (k, cols2) = (b.size()[0], b.size()[1]);
                    // column (c, e) of A ⊗ B is A[:, c] ⊗ B[:, e]: its norm is
                    // the product of theirs, its inner product with W's column
                    // Σ_{a,b} W[(a,b),(c,e)]·A[a,c]·B[b,e]
                    let w4 = wm.reshape([l, k, m, cols2]);
                    let cross = Tensor::einsum("abce,ac,be->ce", &[&w4, w1, &b], None::<i64>);
                    let col = |t: &Tensor| t.square().sum_dim_intlist(0, false, None::<Kind>);
                    (cross.reshape([-1]), col(w1).outer(&col(&b)).reshape([-1]))
                }
            };
            let s = self.scale;
            let base = wm.square().sum_dim_intlist(0, false, None::<Kind>);
            let total = base + cross * (2.0 * s) + square * (s * s);
            // rounding can take an all-but-cancelled column below 0
            let per_channel =
                total
                    .reshape([self.in_features, -1])
                    .sum_dim_intlist(1, false, None::<Kind>);
            per_channel.clamp_min(0.0).sqrt()
        })
    }
}

impl LoraAdapter {
    /// The adapter's update in factored form, or `None` when its shapes are
    /// not ones the factored forms take (the caller then materialises).
    pub(crate) fn update(&self) -> Option<Update> {
        match (self.lyco(), self.down(), self.up()) {
            (Some(l), _, _) => l.update(),
            (None, Some(down), Some(up)) => Update::low_rank(
                to_acc(up).flatten(1, -1),
                to_acc(down).flatten(1, -1),
                self.scale(),
                self.geometry(),
                self.in_features(),
            ),
            _ => None,
        }
    }
}

/// Test probe: how many times this thread formed a full-size `ΔW` (or a
/// merged DoRA weight). The materialising functions call
/// [`note_materialised`]; the factored forward must never do so.
#[cfg(test)]
pub(crate) mod probe {
    use std::cell::Cell;
    thread_local! {
        pub(crate) static MATERIALISED: Cell<usize> = const { Cell::new(0) };
    }
    /// The count so far on this thread.
    pub(crate) fn count() -> usize {
        MATERIALISED.with(Cell::get)
    }
}

#[cfg(test)]
#[path = "factored_tests.rs"]
mod tests;
