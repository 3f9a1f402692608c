//! LyCORIS' LoHa and LoKr adapters (the `lycoris-lora` package's
//! `LohaModule` / `LokrModule`, non-Tucker), as they train and as their
//! files hold them (`docs/design/lycoris.md`):
//!
//! - **LoHa**: `ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) · alpha / r`, keys
//!   `hada_w1_a [out, r]`, `hada_w1_b [r, in·kh·kw]`, `hada_w2_a`, `hada_w2_b`;
//!   initialised `w1_a ~ N(0, 0.1)`, `w1_b, w2_b ~ N(0, 1)`, `w2_a = 0`.
//! - **LoKr**: `ΔW = kron(w1, w2) · scale`, out and in dims split by
//!   [`factorization`]: `w1 [out_l, in_m]` (`lokr_w1`, or `lokr_w1_a @
//!   lokr_w1_b` with `decompose_both`), `w2 [out_k, in_n(·kh·kw)]` (`lokr_w2`,
//!   4-D for a conv, or `lokr_w2_a @ lokr_w2_b` when the rank is below half
//!   its larger side); kaiming-uniform initialisation except the zero
//!   `lokr_w2_b` (or `lokr_w2`); scale `alpha / r`, or 1 when both factors
//!   are full (the saved alpha is then `r`).
//!
//! Every factor product is a matrix `[out, in·kh·kw]`; a conv's ΔW is that
//! matrix viewed as `[out, in, kh, kw]`.

use crate::error::{LoraError, Result};
use crate::factored::{note_materialised, to_acc, Side, Update};
use crate::geometry::Geometry;
use tch::{Device, Kind, Tensor};

/// The key suffixes of the LyCORIS tensors lorakit reads and writes (LoHa,
/// LoKr without Tucker).
pub const KEYS: [&str; 10] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// LyCORIS' `factorization(dimension, factor)`: `dimension = m · n` with
/// `m ≤ n`: `(factor, dimension / factor)` when `factor` divides it, else the
/// most balanced pair whose smaller part is at most `factor` (any size for
/// `factor < 0`).
pub fn factorization(dimension: i64, factor: i64) -> (i64, i64) {
    let sorted = |m: i64, n: i64| if m > n { (n, m) } else { (m, n) };
    if factor > 0 && dimension % factor == 0 {
        return sorted(factor, dimension / factor);
    }
    let factor = if factor < 0 { dimension } else { factor };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut next = m + 1;
        while dimension % next != 0 {
            next += 1;
        }
        let other = dimension / next;
        if next + other > length || next > factor {
            break;
        }
        (m, n) = (next, other);
    }
    sorted(m, n)
}

/// One LoKr factor: a full matrix, or the product of a low-rank pair.
#[derive(Debug)]
pub enum KronFactor {
    /// `lokr_w1` / `lokr_w2` (a conv's `lokr_w2` is 4-D).
    Full(Tensor),
    /// `(…_a, …_b)`: the factor is `a @ b`.
    Low(Tensor, Tensor),
}

impl KronFactor {
    fn matrix(&self) -> Tensor {
        match self {
            Self::Full(w) => to_acc(&w.flatten(1, -1)),
            Self::Low(a, b) => to_acc(a).matmul(&to_acc(b)),
        }
    }
    fn rank(&self) -> Option<i64> {
        match self {
            Self::Full(_) => None,
            Self::Low(_, b) => Some(b.size()[0]),
        }
    }
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Full(w) => vec![w],
            Self::Low(a, b) => vec![a, b],
        }
    }
}

/// The factors of a LyCORIS adapter.
#[derive(Debug)]
pub enum Factors {
    /// LoHa: `(w1_a, w1_b, w2_a, w2_b)`.
    LoHa([Tensor; 4]),
    /// LoKr: the small factor `w1` and the large `w2`.
    LoKr {
        /// `[out_l, in_m]`.
        w1: KronFactor,
        /// `[out_k, in_n·kh·kw]`.
        w2: KronFactor,
    },
}

/// A LoHa or LoKr adapter over a Linear or Conv2d.
#[derive(Debug)]
pub struct LycoAdapter {
    factors: Factors,
    /// The saved alpha.
    alpha: f64,
    scale: f64,
    /// `[out, in]` of the base layer.
    out_features: i64,
    in_features: i64,
    geometry: Geometry,
}

/// kaiming_uniform_(a=√5) of a `shape` tensor: U(±1/√fan_in).
fn kaiming(shape: &[i64], opts: (Kind, Device)) -> Tensor {
    let fan_in: i64 = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::empty(shape, opts).uniform_(-bound, bound)
}

fn kernel_size(geometry: Geometry) -> i64 {
    match geometry {
        Geometry::Linear => 1,
        Geometry::Conv2d { kernel, .. } => kernel[0] * kernel[1],
    }
}

fn check_sizes(rank: i64, in_features: i64, out_features: i64) -> Result<()> {
    if rank <= 0 || in_features <= 0 || out_features <= 0 {
        return Err(LoraError::Invalid(format!(
            "rank and sizes must be positive (rank {rank}, in {in_features}, out {out_features})"
        )));
    }
    Ok(())
}

impl LycoAdapter {
    /// A fresh LoHa (LyCORIS' initialisation; ΔW starts at 0). `alpha` of
    /// `None` or 0 is the rank.
    pub fn new_loha(
        in_features: i64,
        out_features: i64,
        rank: i64,
        alpha: Option<f64>,
        geometry: Geometry,
        (kind, device): (Kind, Device),
    ) -> Result<Self> {
        check_sizes(rank, in_features, out_features)?;
        let cols = in_features * kernel_size(geometry);
        let normal = |shape: [i64; 2], std: f64| Tensor::randn(shape, (kind, device)) * std;
        let w1a = normal([out_features, rank], 0.1);
        let w1b = normal([rank, cols], 1.0);
        let w2a = Tensor::zeros([out_features, rank], (kind, device));
        let w2b = normal([rank, cols], 1.0);
        let alpha = alpha.filter(|a| *a != 0.0).unwrap_or(rank as f64);
        Ok(Self {
            factors: Factors::LoHa([w1a, w1b, w2a, w2b]),
            alpha,
            scale: alpha / rank as f64,
            out_features,
            in_features,
            geometry,
        })
    }

    /// A fresh LoKr (LyCORIS' initialisation; ΔW starts at 0): dims split by
    /// [`factorization`] with `factor` (-1: most balanced), `w1` low-rank
    /// only with `decompose_both`.
    pub fn new_lokr(
        in_features: i64,
        out_features: i64,
        rank: i64,
        alpha: Option<f64>,
        (factor, decompose_both): (i64, bool),
        geometry: Geometry,
        (kind, device): (Kind, Device),
    ) -> Result<Self> {
        check_sizes(rank, in_features, out_features)?;
        let opts = (kind, device);
        let (in_m, in_n) = factorization(in_features, factor);
        let (out_l, out_k) = factorization(out_features, factor);
        let half = |a: i64, b: i64| (rank as f64) < a.max(b) as f64 / 2.0;
        let w1 = if decompose_both && half(out_l, in_m) {
            KronFactor::Low(kaiming(&[out_l, rank], opts), kaiming(&[rank, in_m], opts))
        } else {
            KronFactor::Full(kaiming(&[out_l, in_m], opts))
        };
        let cols = in_n * kernel_size(geometry);
        let w2 = if half(out_k, in_n) {
            KronFactor::Low(
                kaiming(&[out_k, rank], opts),
                Tensor::zeros([rank, cols], opts),
            )
        } else {
            let shape = match geometry {
                Geometry::Linear => vec![out_k, in_n],
                Geometry::Conv2d { kernel, .. } => vec![out_k, in_n, kernel[0], kernel[1]],
            };
            KronFactor::Full(Tensor::zeros(shape.as_slice(), opts))
        };
        let both_full = matches!((&w1, &w2), (KronFactor::Full(_), KronFactor::Full(_)));
        let alpha = match alpha.filter(|a| *a != 0.0) {
            Some(a) if !both_full => a,
            _ => rank as f64,
        };
        Ok(Self {
            factors: Factors::LoKr { w1, w2 },
            alpha,
            scale: alpha / rank as f64,
            out_features,
            in_features,
            geometry,
        })
    }

    /// An adapter from a file's tensors (`get` by key suffix: `hada_w1_a`,
    /// `lokr_w1`, …) and its alpha. The scale is the loaders' (ComfyUI's,
    /// A1111's): alpha over the rank of the decomposed factor (LoKr: `w2`'s,
    /// else `w1`'s), 1 without a decomposed factor or an alpha. A file gives
    /// the update's matrix `[out, in·kh·kw]` but not the layer's kernel: the
    /// adapter reads as a Linear of `in·kh·kw` inputs until
    /// [`Self::set_geometry`] fits it to its layer. `Ok(None)`: no LoHa/LoKr key.
    pub fn from_tensors(
        get: &dyn Fn(&str) -> Option<Tensor>,
        alpha: Option<f64>,
    ) -> Result<Option<Self>> {
        let need = |k: &str| {
            get(k).ok_or_else(|| LoraError::Invalid(format!("has some LyCORIS keys but no `{k}`")))
        };
        let factors = if get("hada_w1_a").is_some() {
            Factors::LoHa([
                need("hada_w1_a")?,
                need("hada_w1_b")?,
                need("hada_w2_a")?,
                need("hada_w2_b")?,
            ])
        } else if get("lokr_w1").is_some() || get("lokr_w1_a").is_some() {
            let factor = |full: &str, a: &str, b: &str| -> Result<KronFactor> {
                Ok(match get(full) {
                    Some(w) => KronFactor::Full(w),
                    None => KronFactor::Low(need(a)?, need(b)?),
                })
            };
            Factors::LoKr {
                w1: factor("lokr_w1", "lokr_w1_a", "lokr_w1_b")?,
                w2: factor("lokr_w2", "lokr_w2_a", "lokr_w2_b")?,
            }
        } else {
            return Ok(None);
        };
        let mut a = Self {
            factors,
            alpha: 0.0,
            scale: 1.0,
            out_features: 0,
            in_features: 0,
            geometry: Geometry::Linear,
        };
        for t in a.parameters() {
            if t.dim() != 2 && t.dim() != 4 {
                return Err(LoraError::Invalid(format!(
                    "a LyCORIS factor has shape {:?}",
                    t.size()
                )));
            }
        }
        let rank = a.rank();
        if let (Some(al), Some(r)) = (alpha, rank) {
            if al != 0.0 {
                a.scale = al / r as f64;
            }
        }
        a.alpha = alpha.unwrap_or(rank.unwrap_or(1) as f64);
        let size = a.matrix().size();
        (a.out_features, a.in_features) = (size[0], size[1]);
        Ok(Some(a))
    }

    /// Fits the adapter to a layer of `in_features` inputs and `geometry`:
    /// its update's matrix must be `[out, in_features·kh·kw]`.
    pub fn set_geometry(&mut self, in_features: i64, geometry: Geometry) -> Result<()> {
        let cols = self.in_features * kernel_size(self.geometry);
        if cols != in_features * kernel_size(geometry) {
            return Err(LoraError::Invalid(format!(
                "its factors give a {}×{cols} update, the layer takes {in_features} inputs{}",
                self.out_features,
                match geometry {
                    Geometry::Linear => String::new(),
                    Geometry::Conv2d { kernel, .. } =>
                        format!(" with a {}×{} kernel", kernel[0], kernel[1]),
                }
            )));
        }
        self.in_features = in_features;
        self.geometry = geometry;
        Ok(())
    }

    /// The rank of the decomposed factor (LoHa: its pairs; LoKr: `w2`'s,
    /// else `w1`'s; `None` when both LoKr factors are full).
    pub fn rank(&self) -> Option<i64> {
        match &self.factors {
            Factors::LoHa(w) => Some(w[1].size()[0]),
            Factors::LoKr { w1, w2 } => w2.rank().or(w1.rank()),
        }
    }

    /// The trainable tensors, in file order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        self.named_tensors().into_iter().map(|(_, t)| t).collect()
    }

    /// Replaces every tensor by `f` of it, in file order (moving them, or
    /// setting trained values).
    pub fn map_tensors(&mut self, f: &mut dyn FnMut(&Tensor) -> Tensor) {
        let mut apply = |t: &mut Tensor| *t = f(t);
        match &mut self.factors {
            Factors::LoHa(w) => w.iter_mut().for_each(apply),
            Factors::LoKr { w1, w2 } => {
                for factor in [w1, w2] {
                    match factor {
                        KronFactor::Full(w) => apply(w),
                        KronFactor::Low(a, b) => {
                            apply(a);
                            apply(b);
                        }
                    }
                }
            }
        }
    }

    /// The factor product `[out, in·kh·kw]` in fp32 (fp64 for fp64
    /// factors), without the scale.
    fn matrix(&self) -> Tensor {
        note_materialised();
        match &self.factors {
            Factors::LoHa([w1a, w1b, w2a, w2b]) => {
                to_acc(w1a).matmul(&to_acc(w1b)) * to_acc(w2a).matmul(&to_acc(w2b))
            }
            Factors::LoKr { w1, w2 } => w1.matrix().kron(&w2.matrix()),
        }
    }

    /// `ΔW` in fp32, shaped like the base weight, scale included (LyCORIS'
    /// `get_weight(W.shape)`), without a multiplier.
    pub fn delta_weight(&self) -> Tensor {
        let w = self.matrix() * self.scale;
        match self.geometry {
            Geometry::Linear => w,
            Geometry::Conv2d { kernel, .. } => {
                w.view([self.out_features, self.in_features, kernel[0], kernel[1]])
            }
        }
    }

    /// The adapter branch for input `x`: the base layer's op with
    /// `multiplier · ΔW` (bias-free), in `x`'s dtype, computed in fp32 from
    /// the factors without forming `ΔW` (`factored.rs`: LoHa through its
    /// Khatri–Rao pair, LoKr through its Kronecker factors).
    pub fn delta(&self, x: &Tensor, multiplier: f64) -> Tensor {
        match self.update().filter(|u| u.fits_input(x)) {
            Some(u) => (u.apply(x) * multiplier).to_kind(x.kind()),
            None => self.delta_materialised(x, multiplier),
        }
    }

    /// [`Self::delta`] through the full `ΔW` (the forward before issue 29):
    /// the fallback for shapes the factored forms do not take, and the
    /// tests' reference.
    pub(crate) fn delta_materialised(&self, x: &Tensor, multiplier: f64) -> Tensor {
        let w = (self.delta_weight() * multiplier).to_kind(x.kind());
        crate::geometry::layer_op(self.geometry, x, &w)
    }

    /// The update in factored form ([`crate::factored`]): LoHa as its
    /// Khatri–Rao pair, LoKr as its Kronecker factors; `None` for factor
    /// shapes those forms do not take.
    pub(crate) fn update(&self) -> Option<Update> {
        let (geometry, sizes) = (self.geometry, (self.in_features, self.out_features));
        match &self.factors {
            Factors::LoHa([a, b, c, d]) => {
                Update::loha([a, b, c, d], self.scale, geometry, self.in_features)
            }
            Factors::LoKr { w1, w2 } => {
                let w2 = match w2 {
                    KronFactor::Full(w) => Side::Full(to_acc(&w.flatten(1, -1))),
                    KronFactor::Low(a, b) => Side::Low(to_acc(a), to_acc(b)),
                };
                Update::kron(w1.matrix(), w2, self.scale, geometry, sizes)
            }
        }
    }

    /// The tensors as a LyCORIS file names them (without `alpha`), in its
    /// order.
    pub fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match &self.factors {
            Factors::LoHa([a, b, c, d]) => {
                vec![
                    ("hada_w1_a", a),
                    ("hada_w1_b", b),
                    ("hada_w2_a", c),
                    ("hada_w2_b", d),
                ]
            }
            Factors::LoKr { w1, w2 } => {
                let names = |f: &KronFactor, full: &'static str, low: [&'static str; 2]| match f {
                    KronFactor::Full(_) => vec![full],
                    KronFactor::Low(..) => low.to_vec(),
                };
                let mut out = Vec::new();
                for (f, full, low) in [
                    (w1, "lokr_w1", ["lokr_w1_a", "lokr_w1_b"]),
                    (w2, "lokr_w2", ["lokr_w2_a", "lokr_w2_b"]),
                ] {
                    out.extend(names(f, full, low).into_iter().zip(f.tensors()));
                }
                out
            }
        }
    }

    /// `loha` or `lokr` (LyCORIS' `algo`).
    pub fn algo(&self) -> &'static str {
        match self.factors {
            Factors::LoHa(_) => "loha",
            Factors::LoKr { .. } => "lokr",
        }
    }
    /// The alpha a file holds.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The factor on the factor product.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// Output features of the base layer.
    pub fn out_features(&self) -> i64 {
        self.out_features
    }
    /// Input features of the base layer.
    pub fn in_features(&self) -> i64 {
        self.in_features
    }
    /// The base layer's kind.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
}
