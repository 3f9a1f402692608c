//! One LoRA / LoCon adapter over a frozen base Linear or Conv2d.
//!
//! Math follows kohya's `networks.lora` (see `kohya-format.md` §3):
//! `y = W(x) + up(drop(down(x))) · multiplier · alpha / rank`, with
//! `lora_down` `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv, same kernel,
//! stride, padding and dilation as the base conv) and `lora_up` `[out, r]` /
//! `[out, r, 1, 1]`. `down` is initialised kaiming-uniform(a=√5), `up` with
//! zeros, so a fresh adapter leaves the base output unchanged.

use crate::error::{LoraError, Result};
use tch::{Device, Kind, Tensor};

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

/// Training-only regularisation with kohya's semantics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dropouts {
    /// Neuron dropout on the rank activations (`--network_dropout`), inverted.
    pub dropout: f64,
    /// Drops whole rank channels per sample; scale is divided by `1 − p`.
    pub rank_dropout: f64,
    /// Skips the whole adapter for a forward call with probability `p`.
    pub module_dropout: f64,
}

impl Dropouts {
    /// Validates that every rate is in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("dropout", self.dropout),
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(LoraError::Invalid(format!(
                    "{name} must be in [0, 1), got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// A LoRA adapter: `lora_down`, `lora_up`, `alpha`, a multiplier and dropouts.
#[derive(Debug)]
pub struct LoraAdapter {
    down: Tensor,
    up: Tensor,
    alpha: f64,
    multiplier: f64,
    geometry: Geometry,
    dropouts: Dropouts,
}

impl LoraAdapter {
    /// A fresh adapter: kaiming-uniform(a=√5) `down`, zero `up`.
    /// `alpha` of `None` or `0` means `alpha = rank` (scale 1), as in kohya.
    pub fn new(
        in_features: i64,
        out_features: i64,
        rank: i64,
        alpha: Option<f64>,
        geometry: Geometry,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if rank <= 0 || in_features <= 0 || out_features <= 0 {
            return Err(LoraError::Invalid(format!(
                "LoRA rank and sizes must be positive (rank {rank}, in {in_features}, out {out_features})"
            )));
        }
        let opts = (kind, device);
        let (down_shape, up_shape, fan_in) = match geometry {
            Geometry::Linear => (
                vec![rank, in_features],
                vec![out_features, rank],
                in_features,
            ),
            Geometry::Conv2d { kernel, .. } => (
                vec![rank, in_features, kernel[0], kernel[1]],
                vec![out_features, rank, 1, 1],
                in_features * kernel[0] * kernel[1],
            ),
        };
        // kaiming_uniform_(a=√5): bound = gain·√(3/fan_in), gain = √(2/(1+a²)) → 1/√fan_in.
        let bound = 1.0 / (fan_in as f64).sqrt();
        let down = Tensor::empty(down_shape.as_slice(), opts).uniform_(-bound, bound);
        let up = Tensor::zeros(up_shape.as_slice(), opts);
        Ok(Self::assemble(down, up, alpha, geometry, rank))
    }

    /// An adapter from existing weights (e.g. read from a file). The geometry
    /// is inferred from the shapes; for convs call [`Self::set_conv_params`]
    /// with the base conv's stride/padding/dilation before using `forward`.
    pub fn from_weights(down: Tensor, up: Tensor, alpha: Option<f64>) -> Result<Self> {
        let ds = down.size();
        let us = up.size();
        let bad = |reason: String| Err(LoraError::Invalid(reason));
        let geometry = match (ds.len(), us.len()) {
            (2, 2) => Geometry::Linear,
            (4, 4) if us[2] == 1 && us[3] == 1 => Geometry::conv(ds[2], ds[3]),
            (4, 4) => {
                return bad(format!(
                    "lora_up of a conv adapter must be [out, rank, 1, 1], got {us:?}"
                ))
            }
            _ => {
                return bad(format!(
                    "lora_down {ds:?} and lora_up {us:?} are neither a Linear ([r,in], [out,r]) nor a Conv ([r,in,kh,kw], [out,r,1,1]) pair"
                ))
            }
        };
        if ds[0] != us[1] {
            return bad(format!(
                "rank mismatch: lora_down has rank {} ({ds:?}) but lora_up expects {} ({us:?})",
                ds[0], us[1]
            ));
        }
        if ds[0] == 0 {
            return bad("rank is 0".to_string());
        }
        let rank = ds[0];
        Ok(Self::assemble(down, up, alpha, geometry, rank))
    }

    fn assemble(
        down: Tensor,
        up: Tensor,
        alpha: Option<f64>,
        geometry: Geometry,
        rank: i64,
    ) -> Self {
        let alpha = match alpha {
            Some(a) if a != 0.0 && a.is_finite() => a,
            _ => rank as f64,
        };
        Self {
            down,
            up,
            alpha,
            multiplier: 1.0,
            geometry,
            dropouts: Dropouts::default(),
        }
    }

    /// Sets the base conv's stride, padding and dilation (conv adapters only).
    pub fn set_conv_params(
        &mut self,
        stride: [i64; 2],
        padding: [i64; 2],
        dilation: [i64; 2],
    ) -> Result<()> {
        match &mut self.geometry {
            Geometry::Conv2d {
                stride: s,
                padding: p,
                dilation: d,
                ..
            } => {
                *s = stride;
                *p = padding;
                *d = dilation;
                Ok(())
            }
            Geometry::Linear => Err(LoraError::Invalid(
                "set_conv_params called on a Linear adapter".into(),
            )),
        }
    }

    /// The same adapter (alpha, multiplier, geometry, dropouts kept) with
    /// its weights on `device` in `kind`; weights already there are shared,
    /// not copied, so trainable leaves stay the ones that get gradients.
    pub fn to_device_kind(mut self, device: Device, kind: Kind) -> Self {
        let move_to = |t: &Tensor| {
            if t.device() == device && t.kind() == kind {
                t.shallow_clone()
            } else {
                t.to_device(device).to_kind(kind)
            }
        };
        self.down = move_to(&self.down);
        self.up = move_to(&self.up);
        self
    }

    /// `lora_down.weight`.
    pub fn down(&self) -> &Tensor {
        &self.down
    }
    /// `lora_up.weight`.
    pub fn up(&self) -> &Tensor {
        &self.up
    }
    /// The trainable tensors `[down, up]`.
    pub fn parameters(&self) -> [&Tensor; 2] {
        [&self.down, &self.up]
    }
    /// Replaces both weights (same shapes required).
    pub fn set_weights(&mut self, down: Tensor, up: Tensor) -> Result<()> {
        if down.size() != self.down.size() || up.size() != self.up.size() {
            return Err(LoraError::Invalid(format!(
                "set_weights: expected down {:?} / up {:?}, got {:?} / {:?}",
                self.down.size(),
                self.up.size(),
                down.size(),
                up.size()
            )));
        }
        self.down = down;
        self.up = up;
        Ok(())
    }
    /// Alpha (never 0: a missing alpha reads as the rank).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The rank `r`.
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }
    /// Input features (channels) of the base layer.
    pub fn in_features(&self) -> i64 {
        self.down.size()[1]
    }
    /// Output features (channels) of the base layer.
    pub fn out_features(&self) -> i64 {
        self.up.size()[0]
    }
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }
    /// The geometry (Linear or Conv2d).
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    /// Strength applied in `forward` (1.0 while training).
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }
    /// Sets the strength used in `forward`.
    pub fn set_multiplier(&mut self, m: f64) {
        self.multiplier = m;
    }
    /// Sets training-only dropouts.
    pub fn set_dropouts(&mut self, d: Dropouts) -> Result<()> {
        d.validate()?;
        self.dropouts = d;
        Ok(())
    }
    /// The dropouts in use.
    pub fn dropouts(&self) -> Dropouts {
        self.dropouts
    }
    /// The adapter branch alone: `up(drop(down(x))) · multiplier · scale`,
    /// in the dtype of `x` (`None` is kept for adapters that add nothing).
    ///
    /// Module dropout (training only) draws one number per call from
    /// torch's generator on `x`'s device, as kohya's `torch.rand(1)` does, so
    /// every module draws its own, the draw follows `tch::manual_seed` (exact
    /// resume) and gradient checkpointing's RNG replay recomputes the same
    /// choice. The branch is multiplied by the 0/1 draw on the device instead
    /// of skipped on the host, so no host sync is needed.
    pub fn delta(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        let d = self.dropouts;
        let keep = (train && d.module_dropout > 0.0).then(|| {
            Tensor::rand([], (Kind::Float, x.device()))
                .ge(d.module_dropout)
                .to_kind(self.down.kind())
        });
        let in_kind = x.kind();
        let xk = if in_kind == self.down.kind() {
            x.shallow_clone()
        } else {
            x.to_kind(self.down.kind())
        };
        let mut scale = self.scale() * self.multiplier;
        let mut h = match self.geometry {
            Geometry::Linear => xk.linear::<&Tensor>(&self.down, None),
            Geometry::Conv2d {
                stride,
                padding,
                dilation,
                ..
            } => xk.conv2d::<&Tensor>(&self.down, None, stride, padding, dilation, 1),
        };
        if train && d.dropout > 0.0 {
            h = h.dropout(d.dropout, true);
        }
        if train && d.rank_dropout > 0.0 {
            let r = self.rank();
            let b = h.size()[0];
            let mask = Tensor::rand([b, r], (h.kind(), h.device()))
                .gt(d.rank_dropout)
                .to_kind(h.kind());
            let mask = match self.geometry {
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
        let out = match self.geometry {
            Geometry::Linear => h.linear::<&Tensor>(&self.up, None),
            Geometry::Conv2d { .. } => {
                h.conv2d::<&Tensor>(&self.up, None, [1, 1], [0, 0], [1, 1], 1)
            }
        };
        // alpha = rank at strength 1 (a common setup) needs no scaling op.
        let out = if scale == 1.0 { out } else { out * scale };
        let out = match keep {
            Some(k) => out * k,
            None => out,
        };
        Some(if out.kind() == in_kind {
            out
        } else {
            out.to_kind(in_kind)
        })
    }

    /// `base_out + delta(x)`: the adapted layer's output given the base layer's output.
    pub fn forward(&self, x: &Tensor, base_out: &Tensor, train: bool) -> Tensor {
        match self.delta(x, train) {
            Some(d) => base_out + d.to_kind(base_out.kind()),
            None => base_out.shallow_clone(),
        }
    }

    /// `ΔW = scale · up @ down` in fp32, shaped like the base weight
    /// (`[out, in]` or `[out, in, kh, kw]`), without the multiplier.
    pub fn delta_weight(&self) -> Tensor {
        let up = self.up.flatten(1, -1).to_kind(Kind::Float);
        let down = self.down.flatten(1, -1).to_kind(Kind::Float);
        let w = up.matmul(&down) * self.scale();
        match self.geometry {
            Geometry::Linear => w,
            Geometry::Conv2d { kernel, .. } => w.view([
                self.out_features(),
                self.in_features(),
                kernel[0],
                kernel[1],
            ]),
        }
    }

    fn check_base(&self, base: &Tensor) -> Result<()> {
        let expect: Vec<i64> = match self.geometry {
            Geometry::Linear => vec![self.out_features(), self.in_features()],
            Geometry::Conv2d { kernel, .. } => {
                vec![
                    self.out_features(),
                    self.in_features(),
                    kernel[0],
                    kernel[1],
                ]
            }
        };
        if base.size() != expect {
            return Err(LoraError::Invalid(format!(
                "base weight has shape {:?} but this LoRA module expects {expect:?}",
                base.size()
            )));
        }
        Ok(())
    }

    /// `W + strength · ΔW`, computed in fp32 and cast back to `W`'s dtype.
    pub fn merged_weight(&self, base: &Tensor, strength: f64) -> Result<Tensor> {
        self.check_base(base)?;
        let dw = self.delta_weight().to_device(base.device());
        Ok((base.to_kind(Kind::Float) + dw * strength).to_kind(base.kind()))
    }

    /// `W − strength · ΔW` (undo [`Self::merged_weight`]; exact up to the base dtype's rounding).
    pub fn unmerged_weight(&self, merged: &Tensor, strength: f64) -> Result<Tensor> {
        self.merged_weight(merged, -strength)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn zero_up_leaves_base_unchanged() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(1);
        let a = LoraAdapter::new(
            8,
            6,
            4,
            Some(2.0),
            Geometry::Linear,
            Kind::Float,
            Device::Cpu,
        )
        .unwrap();
        let x = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu));
        let base = Tensor::randn([3, 5, 6], (Kind::Float, Device::Cpu));
        let y = a.forward(&x, &base, true);
        assert_eq!(max_abs(&y, &base), 0.0);
        // down is kaiming-uniform: bounded by 1/sqrt(in) and not all zero.
        let bound = 1.0 / 8f64.sqrt();
        assert!(a.down().abs().max().double_value(&[]) <= bound);
        assert!(a.down().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn alpha_defaults_to_rank() {
        let _rng = crate::test_rng_lock();
        let d = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
        let u = Tensor::ones([5, 4], (Kind::Float, Device::Cpu));
        let a = LoraAdapter::from_weights(d.copy(), u.copy(), None).unwrap();
        assert_eq!(a.alpha(), 4.0);
        assert_eq!(a.scale(), 1.0);
        let a = LoraAdapter::from_weights(d, u, Some(0.0)).unwrap();
        assert_eq!(a.alpha(), 4.0);
    }

    #[test]
    fn rank_mismatch_is_an_error() {
        let _rng = crate::test_rng_lock();
        let d = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
        let u = Tensor::ones([5, 2], (Kind::Float, Device::Cpu));
        let e = LoraAdapter::from_weights(d, u, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank mismatch"), "{e}");
    }

    #[test]
    fn module_dropout_skips_some_calls_deterministically() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        let mut a =
            LoraAdapter::new(4, 4, 2, None, Geometry::Linear, Kind::Float, Device::Cpu).unwrap();
        a.set_weights(
            a.down().copy(),
            Tensor::ones([4, 2], (Kind::Float, Device::Cpu)),
        )
        .unwrap();
        a.set_dropouts(Dropouts {
            module_dropout: 0.5,
            ..Default::default()
        })
        .unwrap();
        let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
        let is_dropped = |a: &LoraAdapter| {
            a.delta(&x, true)
                .unwrap()
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                == 0.0
        };
        let dropped = |a: &LoraAdapter| -> Vec<bool> { (0..64).map(|_| is_dropped(a)).collect() };
        tch::manual_seed(7);
        let pattern = dropped(&a);
        let skipped = pattern.iter().filter(|s| **s).count();
        assert!((16..48).contains(&skipped), "skipped {skipped} of 64");
        // the draw follows torch's generator: the same seed, the same choices
        tch::manual_seed(7);
        assert_eq!(pattern, dropped(&a));
        // two adapters drawing in turn from one generator choose independently
        let b = LoraAdapter::from_weights(a.down().copy(), a.up().copy(), None).unwrap();
        let mut b = b;
        b.set_dropouts(a.dropouts()).unwrap();
        tch::manual_seed(9);
        let (mut same, mut n) = (0, 0);
        for _ in 0..64 {
            let (da, db) = (is_dropped(&a), is_dropped(&b));
            same += usize::from(da == db);
            n += 1;
        }
        assert!(same < n, "two modules always dropped together");
        // never in eval
        let full = a
            .delta(&x, false)
            .unwrap()
            .abs()
            .sum(Kind::Float)
            .double_value(&[]);
        assert!(full > 0.0);
        assert!((0..64).all(|_| a
            .delta(&x, false)
            .unwrap()
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            == full));
    }

    #[test]
    fn rank_dropout_keeps_expectation() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(3);
        let mut a =
            LoraAdapter::new(16, 8, 64, None, Geometry::Linear, Kind::Float, Device::Cpu).unwrap();
        a.set_weights(
            a.down().copy(),
            Tensor::randn([8, 64], (Kind::Float, Device::Cpu)),
        )
        .unwrap();
        let x = Tensor::randn([1, 16], (Kind::Float, Device::Cpu));
        let exact = a.delta(&x, false).unwrap();
        a.set_dropouts(Dropouts {
            rank_dropout: 0.25,
            ..Default::default()
        })
        .unwrap();
        let n = 400;
        let mut acc = exact.zeros_like();
        for _ in 0..n {
            acc += a.delta(&x.repeat([1, 1]), true).unwrap();
        }
        let mean = acc / n as f64;
        let rel = max_abs(&mean, &exact) / exact.abs().max().double_value(&[]);
        assert!(rel < 0.2, "relative error {rel}");
        assert!(Dropouts {
            dropout: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
