//! One LoRA / LoCon adapter over a frozen base Linear or Conv2d.
//!
//! Math follows kohya's `networks.lora` (see `kohya-format.md` §3):
//! `y = W(x) + up(drop(down(x))) · multiplier · alpha / rank`, with
//! `lora_down` `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv, same kernel,
//! stride, padding and dilation as the base conv) and `lora_up` `[out, r]` /
//! `[out, r, 1, 1]`. `down` is initialised kaiming-uniform(a=√5), `up` with
//! zeros, so a fresh adapter leaves the base output unchanged.

pub use crate::dropout::Dropouts;
use crate::dropout::{BatchRows, ModuleSwitch};
use crate::error::{LoraError, Result};
pub use crate::geometry::Geometry;
use crate::lycoris::LycoAdapter;
use tch::{Device, Kind, Tensor};

/// The trained tensors of an adapter.
#[derive(Debug)]
enum Weights {
    /// kohya LoRA / LoCon: `lora_down`, `lora_up`.
    Pair { down: Tensor, up: Tensor },
    /// LyCORIS LoHa / LoKr (their own alpha, scale and layer shape).
    Lyco(LycoAdapter),
}

/// An adapter over one layer: a kohya LoRA / LoCon pair (`lora_down`,
/// `lora_up`, `alpha`) or a LyCORIS LoHa / LoKr ([`LycoAdapter`]), with a
/// multiplier and dropouts.
#[derive(Debug)]
pub struct LoraAdapter {
    weights: Weights,
    /// DoRA's learned magnitude (`dora_scale`), see [`crate::dora`].
    pub(crate) dora: Option<Tensor>,
    alpha: f64,
    multiplier: f64,
    geometry: Geometry,
    dropouts: Dropouts,
    /// Module dropout's choice for the current training forward.
    switch: ModuleSwitch,
    /// This process's rows of the global batch (data-parallel training).
    rows: Option<BatchRows>,
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

    /// A LyCORIS adapter (its alpha, scale and layer shape are its own).
    pub fn from_lyco(lyco: LycoAdapter) -> Self {
        Self {
            alpha: lyco.alpha(),
            geometry: lyco.geometry(),
            weights: Weights::Lyco(lyco),
            dora: None,
            multiplier: 1.0,
            dropouts: Dropouts::default(),
            switch: ModuleSwitch::default(),
            rows: None,
        }
    }

    /// An adapter from a module's tensors under their file key suffixes
    /// (`get`: `lora_down.weight` / `lora_up.weight`, or LyCORIS'
    /// `hada_w1_a`, `lokr_w1`, …, and DoRA's `dora_scale`) and its alpha:
    /// how a file and the trainer's leaves rebuild a module. `Ok(None)`:
    /// neither a pair nor LyCORIS tensors.
    pub fn from_named(
        get: &dyn Fn(&str) -> Option<Tensor>,
        alpha: Option<f64>,
    ) -> Result<Option<Self>> {
        let mut a = match (get("lora_down.weight"), get("lora_up.weight")) {
            (Some(down), Some(up)) => Self::from_weights(down, up, alpha)?,
            _ => match LycoAdapter::from_tensors(get, alpha)? {
                Some(l) => Self::from_lyco(l),
                None => return Ok(None),
            },
        };
        if let Some(m) = get("dora_scale") {
            a.set_dora_scale(m);
        }
        Ok(Some(a))
    }

    /// The LyCORIS adapter inside, if this is one.
    pub fn lyco(&self) -> Option<&LycoAdapter> {
        match &self.weights {
            Weights::Lyco(l) => Some(l),
            Weights::Pair { .. } => None,
        }
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
            weights: Weights::Pair { down, up },
            dora: None,
            alpha,
            multiplier: 1.0,
            geometry,
            dropouts: Dropouts::default(),
            switch: ModuleSwitch::default(),
            rows: None,
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
            }
            Geometry::Linear => {
                return Err(LoraError::Invalid(
                    "set_conv_params called on a Linear adapter".into(),
                ))
            }
        }
        if let Weights::Lyco(l) = &mut self.weights {
            l.set_geometry(l.in_features(), self.geometry)?;
        }
        Ok(())
    }

    /// Fits an adapter read from a file to the layer it adapts (`in_features`
    /// inputs, `geometry`): a conv adapter takes the layer's stride, padding
    /// and dilation; a LyCORIS adapter, whose file gives only its update's
    /// matrix `[out, in·kh·kw]`, takes the layer's shape when the sizes agree.
    pub fn fit_layer(&mut self, in_features: i64, geometry: Geometry) -> Result<()> {
        if let Weights::Lyco(l) = &mut self.weights {
            l.set_geometry(in_features, geometry)?;
            self.geometry = geometry;
            return Ok(());
        }
        if self.in_features() != in_features {
            return Err(LoraError::Invalid(format!(
                "takes {} inputs, the layer {in_features}",
                self.in_features()
            )));
        }
        match geometry {
            _ if geometry == self.geometry => Ok(()),
            Geometry::Conv2d {
                kernel,
                stride,
                padding,
                dilation,
            } if self.geometry == Geometry::conv(kernel[0], kernel[1]) => {
                self.set_conv_params(stride, padding, dilation)
            }
            _ => Err(LoraError::Invalid(format!(
                "its kind ({:?}) does not fit the layer ({geometry:?})",
                self.geometry
            ))),
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
        match &mut self.weights {
            Weights::Pair { down, up } => {
                *down = move_to(down);
                *up = move_to(up);
            }
            Weights::Lyco(l) => l.map_tensors(&mut |t| move_to(t)),
        }
        // the magnitude stays fp32 (LyCORIS keeps it so), on the device
        self.dora = self.dora.as_ref().map(|d| move_to(d).to_kind(Kind::Float));
        self
    }

    /// `lora_down.weight` (LoRA / LoCon adapters).
    pub fn down(&self) -> Option<&Tensor> {
        match &self.weights {
            Weights::Pair { down, .. } => Some(down),
            Weights::Lyco(_) => None,
        }
    }
    /// `lora_up.weight` (LoRA / LoCon adapters).
    pub fn up(&self) -> Option<&Tensor> {
        match &self.weights {
            Weights::Pair { up, .. } => Some(up),
            Weights::Lyco(_) => None,
        }
    }
    /// The trainable tensors, in file order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        self.named_tensors().into_iter().map(|(_, t)| t).collect()
    }
    /// The tensors under their file key suffixes (`lora_down.weight`,
    /// `lora_up.weight`, or LyCORIS' `hada_w1_a`, `lokr_w1`, …), without `alpha`.
    pub fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = match &self.weights {
            Weights::Pair { down, up } => vec![("lora_down.weight", down), ("lora_up.weight", up)],
            Weights::Lyco(l) => l.named_tensors(),
        };
        out.extend(self.dora.as_ref().map(|d| ("dora_scale", d)));
        out
    }
    /// Replaces both weights of a LoRA / LoCon pair (same shapes required).
    pub fn set_weights(&mut self, down: Tensor, up: Tensor) -> Result<()> {
        self.set_parameters(vec![down, up])
    }
    /// Replaces every tensor ([`Self::named_tensors`] order, same shapes).
    pub fn set_parameters(&mut self, tensors: Vec<Tensor>) -> Result<()> {
        let want: Vec<Vec<i64>> = self.parameters().iter().map(|t| t.size()).collect();
        let got: Vec<Vec<i64>> = tensors.iter().map(|t| t.size()).collect();
        if want != got {
            return Err(LoraError::Invalid(format!(
                "set_parameters: expected shapes {want:?}, got {got:?}"
            )));
        }
        let mut it = tensors.into_iter();
        match &mut self.weights {
            Weights::Pair { down, up } => {
                *down = it.next().expect("checked");
                *up = it.next().expect("checked");
            }
            Weights::Lyco(l) => l.map_tensors(&mut |_| it.next().expect("checked")),
        }
        if let Some(d) = &mut self.dora {
            *d = it.next().expect("checked");
        }
        Ok(())
    }
    /// Alpha (never 0: a missing alpha reads as the rank).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The rank `r` (a LoKr with only full factors: 0).
    pub fn rank(&self) -> i64 {
        match &self.weights {
            Weights::Pair { down, .. } => down.size()[0],
            Weights::Lyco(l) => l.rank().unwrap_or(0),
        }
    }
    /// Input features (channels) of the base layer.
    pub fn in_features(&self) -> i64 {
        match &self.weights {
            Weights::Pair { down, .. } => down.size()[1],
            Weights::Lyco(l) => l.in_features(),
        }
    }
    /// Output features (channels) of the base layer.
    pub fn out_features(&self) -> i64 {
        match &self.weights {
            Weights::Pair { up, .. } => up.size()[0],
            Weights::Lyco(l) => l.out_features(),
        }
    }
    /// The factor on the update: `alpha / rank` (LyCORIS: its own rule).
    pub fn scale(&self) -> f64 {
        match &self.weights {
            Weights::Pair { .. } => self.alpha / self.rank() as f64,
            Weights::Lyco(l) => l.scale(),
        }
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
    /// The handle of this adapter's module-dropout switch (see
    /// [`ModuleSwitch`]): a trainer keeps it to draw the choice before each
    /// forward.
    pub fn module_switch(&self) -> ModuleSwitch {
        self.switch.clone()
    }
    /// Shares a run's [`BatchRows`]: neuron and rank dropout then draw
    /// their masks for the global batch and keep this process's rows.
    pub fn set_batch_rows(&mut self, rows: BatchRows) {
        self.rows = Some(rows);
    }
    /// The run's rows, when set.
    pub(crate) fn batch_rows(&self) -> Option<&BatchRows> {
        self.rows.as_ref()
    }
    /// Whether a forward leaves this adapter out: training, and dropped
    /// by its [`ModuleSwitch`].
    pub(crate) fn left_out(&self, train: bool) -> bool {
        train && self.switch.is_dropped()
    }

    /// The adapter branch alone: `up(drop(down(x))) · multiplier · scale`,
    /// in the dtype of `x`; `None` when module dropout leaves the adapter
    /// out of this training forward ([`ModuleSwitch`]: the layer keeps its
    /// base output and the adapter's tensors get no gradient, as kohya's).
    pub fn delta(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        if self.left_out(train) {
            return None;
        }
        match &self.weights {
            Weights::Pair { down, up } => Some(self.pair_delta(down, up, x, train)),
            Weights::Lyco(l) => Some(l.delta(x, self.multiplier)),
        }
    }

    /// `base_out + delta(x)`: the adapted layer's output given the base layer's output.
    pub fn forward(&self, x: &Tensor, base_out: &Tensor, train: bool) -> Tensor {
        match self.delta(x, train) {
            Some(d) => base_out + d.to_kind(base_out.kind()),
            None => base_out.shallow_clone(),
        }
    }

    /// `ΔW = scale · up @ down` in fp32 (fp64 for fp64 weights), shaped like the base weight
    /// (`[out, in]` or `[out, in, kh, kw]`), without the multiplier.
    pub fn delta_weight(&self) -> Tensor {
        let (down, up) = match &self.weights {
            Weights::Pair { down, up } => (down, up),
            Weights::Lyco(l) => return l.delta_weight(),
        };
        crate::factored::note_materialised();
        let up = crate::factored::to_acc(&up.flatten(1, -1));
        let down = crate::factored::to_acc(&down.flatten(1, -1));
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

    /// The shape of the weight this module changes, `[out, in(, kh, kw)]`.
    pub fn weight_shape(&self) -> Vec<i64> {
        match self.geometry {
            Geometry::Linear => vec![self.out_features(), self.in_features()],
            Geometry::Conv2d { kernel, .. } => {
                vec![
                    self.out_features(),
                    self.in_features(),
                    kernel[0],
                    kernel[1],
                ]
            }
        }
    }

    /// Whether this module can change a weight of `shape`: its own shape; a
    /// LyCORIS update read from a file (its matrix `[out, in·kh·kw]`, the
    /// layer's kernel unknown) also fits any weight of the same rows and size.
    pub fn fits_weight(&self, shape: &[i64]) -> bool {
        let own = self.weight_shape();
        let size = |s: &[i64]| s.iter().product::<i64>();
        shape == own.as_slice()
            || (self.lyco().is_some() && shape.first() == own.first() && size(shape) == size(&own))
    }

    pub(crate) fn check_base(&self, base: &Tensor) -> Result<()> {
        if !self.fits_weight(&base.size()) {
            return Err(LoraError::Invalid(format!(
                "base weight has shape {:?} but this LoRA module expects {:?}",
                base.size(),
                self.weight_shape()
            )));
        }
        Ok(())
    }

    /// `W + strength · ΔW` (DoRA: `W + strength · (W' − W)`, as ComfyUI and
    /// A1111 apply a strength), computed in fp32 and cast back to `W`'s dtype.
    pub fn merged_weight(&self, base: &Tensor, strength: f64) -> Result<Tensor> {
        self.check_base(base)?;
        let w = base.to_kind(Kind::Float);
        let dw = self.delta_weight().to_device(base.device()).view_as(&w);
        let merged = match &self.dora {
            Some(m) => {
                &w + (crate::dora::decomposed(&w, &dw, &m.to_device(w.device())) - &w) * strength
            }
            None => &w + dw * strength,
        };
        Ok(merged.to_kind(base.kind()))
    }

    /// `W − strength · ΔW` (undo [`Self::merged_weight`]; exact up to the base dtype's rounding).
    pub fn unmerged_weight(&self, merged: &Tensor, strength: f64) -> Result<Tensor> {
        self.merged_weight(merged, -strength)
    }
}

#[cfg(test)]
#[path = "adapter_tests.rs"]
mod tests;
