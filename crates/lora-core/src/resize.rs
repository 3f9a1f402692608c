//! Rank reduction of trained LoRAs — what kohya's `resize_lora.py` does:
//! each module's ΔW = up·down is replaced by its best rank-`n` approximation
//! (truncated SVD, Eckart–Young), with `n` fixed or chosen per module from
//! the singular values (`sv_ratio`, `sv_cumulative`, `sv_fro`). The scale
//! `alpha / rank` is kept, so the resized LoRA is used at the same strength.
//!
//! ΔW has rank ≤ r, so instead of an SVD of the full `out × in` product (what
//! kohya runs: minutes on CPU for an SDXL LoRA) the SVD is taken of an `r × r`
//! core: `up = Qu·Ru`, `downᵀ = Qd·Rd` (thin QR), `up·down = Qu·(Ru·Rdᵀ)·Qdᵀ`.
//! Same singular values and subspaces, `O((out + in)·r²)` work, in f64.
//!
//! ```no_run
//! use lora_core::resize::{note_resize, resize_set, RankRule, ResizeOptions};
//! use lora_core::{load_lora, UnknownKeys};
//!
//! let lora = load_lora("my_lora.safetensors", UnknownKeys::Reject)?;
//! let opts = ResizeOptions { rank: 16, conv_rank: 8, rule: RankRule::SvFro(0.95) };
//! let (set, stats) = resize_set(&lora.set, &opts)?;
//! let mut meta = lora.metadata.clone();
//! note_resize(&mut meta, &opts, &stats);
//! set.save("my_lora-dyn16.safetensors", tch::Kind::Half, &meta)?;
//! # Ok::<(), lora_core::LoraError>(())
//! ```

use crate::adapter::{Geometry, LoraAdapter};
use crate::error::{LoraError, Result};
use crate::metadata::py_float;
use crate::naming::ModuleKey;
use crate::set::LoraSet;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Below this largest singular value a module is treated as empty and kept
/// at rank 1 (kohya's `MIN_SV`).
pub const MIN_SINGULAR_VALUE: f64 = 1e-6;

/// How the new rank of each module is chosen (never above the maximum given
/// in [`ResizeOptions`], never above the module's current rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// The maximum rank for every module.
    Fixed,
    /// Keep singular values above `σ_max / ratio` (kohya `sv_ratio`).
    SvRatio(f64),
    /// Keep the leading singular values until their sum reaches this fraction
    /// of the total (kohya `sv_cumulative`).
    SvCumulative(f64),
    /// Keep the leading singular values until this fraction of ΔW's Frobenius
    /// norm is reached (kohya `sv_fro`).
    SvFro(f64),
}

impl RankRule {
    /// Parses `fixed`, `sv_ratio:R`, `sv_cumulative:F` or `sv_fro:F`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            LoraError::Invalid(format!(
                "rank rule `{s}`: {why} (use sv_ratio:R with R > 1, sv_cumulative:F or sv_fro:F with 0 < F ≤ 1, or fixed)"
            ))
        };
        if s == "fixed" {
            return Ok(RankRule::Fixed);
        }
        let (name, value) = s.split_once(':').ok_or_else(|| bad("missing `:value`"))?;
        let v: f64 = value
            .trim()
            .parse()
            .map_err(|_| bad("the value is not a number"))?;
        let rule = match name.trim() {
            "sv_ratio" => RankRule::SvRatio(v),
            "sv_cumulative" => RankRule::SvCumulative(v),
            "sv_fro" => RankRule::SvFro(v),
            _ => return Err(bad("unknown rule")),
        };
        rule.validate().map_err(|_| bad("value out of range"))?;
        Ok(rule)
    }

    fn validate(&self) -> Result<()> {
        let ok = match *self {
            RankRule::Fixed => true,
            RankRule::SvRatio(r) => r.is_finite() && r >= 1.0,
            RankRule::SvCumulative(f) | RankRule::SvFro(f) => f > 0.0 && f <= 1.0,
        };
        if ok {
            Ok(())
        } else {
            Err(LoraError::Invalid(format!("invalid rank rule {self}")))
        }
    }

    /// The rank this rule keeps for singular values `s` (descending), before
    /// the maximum is applied; at least 1.
    pub fn rank_for(&self, s: &[f64]) -> usize {
        let n = s.len().max(1);
        // index of the first cumulative fraction ≥ target (torch.searchsorted, left)
        let first_reaching = |fractions: Vec<f64>, target: f64| {
            fractions.iter().position(|&c| c >= target).unwrap_or(n - 1) + 1
        };
        let cumulative = |vals: Vec<f64>| {
            let total: f64 = vals.iter().sum();
            let mut acc = 0.0;
            vals.iter()
                .map(|v| {
                    acc += v;
                    acc / total
                })
                .collect::<Vec<_>>()
        };
        let k = match *self {
            RankRule::Fixed => n,
            RankRule::SvRatio(r) => {
                let min = s.first().copied().unwrap_or(0.0) / r;
                s.iter().filter(|&&v| v > min).count()
            }
            RankRule::SvCumulative(f) => first_reaching(cumulative(s.to_vec()), f),
            RankRule::SvFro(f) => {
                first_reaching(cumulative(s.iter().map(|v| v * v).collect()), f * f)
            }
        };
        k.clamp(1, n)
    }
}

impl std::fmt::Display for RankRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankRule::Fixed => write!(f, "fixed"),
            RankRule::SvRatio(v) => write!(f, "sv_ratio:{v}"),
            RankRule::SvCumulative(v) => write!(f, "sv_cumulative:{v}"),
            RankRule::SvFro(v) => write!(f, "sv_fro:{v}"),
        }
    }
}

/// Options of [`resize_set`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeOptions {
    /// Maximum rank of Linear and 1x1-conv modules.
    pub rank: i64,
    /// Maximum rank of kxk-conv (LoCon) modules.
    pub conv_rank: i64,
    /// How each module's rank is chosen up to that maximum.
    pub rule: RankRule,
}

/// What resizing did to one module.
#[derive(Debug, Clone, PartialEq)]
pub struct ResizeStats {
    /// Rank before.
    pub old_rank: i64,
    /// Rank after.
    pub new_rank: i64,
    /// ‖ΔW_new‖_F / ‖ΔW‖_F (1 when ΔW is zero).
    pub fro_retained: f64,
    /// Σ kept σ / Σ σ (1 when ΔW is zero); `None` where only the leading
    /// singular values were computed (extraction).
    pub sum_retained: Option<f64>,
}

/// Resizes one adapter to at most `max_rank` with `rule`. The result has
/// the same geometry (conv stride/padding/dilation included), the same
/// scale `alpha / rank` and fp32 weights on the adapter's device; the
/// singular values go into `lora_up` as kohya does.
pub fn resize_adapter(
    a: &LoraAdapter,
    max_rank: i64,
    rule: RankRule,
) -> Result<(LoraAdapter, ResizeStats)> {
    if max_rank < 1 {
        return Err(LoraError::Invalid(format!(
            "the new rank must be at least 1, got {max_rank}"
        )));
    }
    rule.validate()?;
    let (Some(down), Some(up)) = (a.down(), a.up()) else {
        let algo = a.lyco().map_or("LyCORIS", |l| l.algo());
        return Err(LoraError::Invalid(format!(
            "resizing works on LoRA / LoCon modules (lora_down / lora_up); this one is {algo}, which has no rank to cut by SVD"
        )));
    };
    let r = a.rank();
    let out = a.out_features();
    let down_shape = down.size();
    let up2 = up.detach().to_kind(Kind::Double).reshape([out, r]);
    let down2 = down.detach().to_kind(Kind::Double).reshape([r, -1]);
    let inner = down2.size()[1];
    let fail = |what: &str, e: tch::TchError| LoraError::Invalid(format!("{what}: {e}"));
    let (qu, ru) = Tensor::f_linalg_qr(&up2, "reduced").map_err(|e| fail("QR of lora_up", e))?;
    let (qd, rd) =
        Tensor::f_linalg_qr(&down2.tr(), "reduced").map_err(|e| fail("QR of lora_down", e))?;
    let core = ru.matmul(&rd.tr());
    let (um, s, vm) = core
        .f_svd(true, true)
        .map_err(|e| fail("SVD of the rank core", e))?;
    let sv: Vec<f64> = Vec::<f64>::try_from(&s).map_err(|e| fail("singular values", e))?;
    let largest = sv.first().copied().unwrap_or(0.0);
    let keep = if largest <= MIN_SINGULAR_VALUE {
        1
    } else {
        rule.rank_for(&sv).min(max_rank as usize)
    };
    let keep = keep.min(sv.len()).max(1);
    let k = keep as i64;
    // up = U_k·diag(S_k), down = V_kᵀ
    let u = qu.matmul(&um.narrow(1, 0, k)) * s.narrow(0, 0, k).unsqueeze(0);
    let vh = qd.matmul(&vm.narrow(1, 0, k)).tr();
    let (down, up) = match a.geometry() {
        Geometry::Linear => (vh.reshape([k, inner]), u.reshape([out, k])),
        Geometry::Conv2d { .. } => (
            vh.reshape([k, down_shape[1], down_shape[2], down_shape[3]]),
            u.reshape([out, k, 1, 1]),
        ),
    };
    let mut resized = LoraAdapter::from_weights(
        down.to_kind(Kind::Float).contiguous(),
        up.to_kind(Kind::Float).contiguous(),
        Some(a.scale() * k as f64),
    )?;
    if let Geometry::Conv2d {
        stride,
        padding,
        dilation,
        ..
    } = a.geometry()
    {
        resized.set_conv_params(stride, padding, dilation)?;
    }
    let total: f64 = sv.iter().sum();
    let total_sq: f64 = sv.iter().map(|v| v * v).sum();
    let kept = &sv[..keep];
    let ratio = |part: f64, whole: f64| if whole > 0.0 { part / whole } else { 1.0 };
    let stats = ResizeStats {
        old_rank: r,
        new_rank: k,
        fro_retained: ratio(kept.iter().map(|v| v * v).sum::<f64>(), total_sq).sqrt(),
        sum_retained: Some(ratio(kept.iter().sum(), total)),
    };
    Ok((resized, stats))
}

/// Resizes every adapter of `set` (kxk convs to `conv_rank`, the rest to
/// `rank`); returns the new set and, per module, what changed.
pub fn resize_set(
    set: &LoraSet,
    opts: &ResizeOptions,
) -> Result<(LoraSet, Vec<(ModuleKey, ResizeStats)>)> {
    let mut out = LoraSet::new();
    let mut stats = Vec::with_capacity(set.len());
    for (key, a) in set.iter() {
        let max = if a.geometry().is_spatial_conv() {
            opts.conv_rank
        } else {
            opts.rank
        };
        let (resized, st) = resize_adapter(a, max, opts.rule)
            .map_err(|e| LoraError::Invalid(format!("{}: {e}", key.kohya_name())))?;
        out.insert(key.clone(), resized);
        stats.push((key.clone(), st));
    }
    Ok((out, stats))
}

/// Updates training metadata for a resized file as kohya does: the rank and
/// alpha (`Dynamic` for per-module rules) and a note in
/// `ss_training_comment`. Hashes are recomputed by [`LoraSet::save`].
pub fn note_resize(
    metadata: &mut BTreeMap<String, String>,
    opts: &ResizeOptions,
    stats: &[(ModuleKey, ResizeStats)],
) {
    let old = stats.iter().map(|(_, s)| s.old_rank).max().unwrap_or(0);
    let comment = metadata
        .get("ss_training_comment")
        .cloned()
        .unwrap_or_default();
    let note = match opts.rule {
        RankRule::Fixed => {
            let conv = if opts.conv_rank != opts.rank {
                format!(" (conv: {})", opts.conv_rank)
            } else {
                String::new()
            };
            // the scale alpha/dim is kept, so alpha scales with the rank
            let num = |k: &str| metadata.get(k).and_then(|v| v.parse::<f64>().ok());
            if let (Some(alpha), Some(dim)) = (num("ss_network_alpha"), num("ss_network_dim")) {
                if dim > 0.0 {
                    let new_alpha = alpha / dim * opts.rank as f64;
                    metadata.insert("ss_network_alpha".into(), py_float(new_alpha));
                }
            }
            metadata.insert("ss_network_dim".into(), opts.rank.to_string());
            // and the LoCon conv rank / alpha in the network args, when given there
            let args = metadata
                .get("ss_network_args")
                .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok());
            if let Some(serde_json::Value::Object(mut args)) = args {
                let as_f64 = |v: Option<&serde_json::Value>| match v {
                    Some(serde_json::Value::String(s)) => s.parse::<f64>().ok(),
                    Some(v) => v.as_f64(),
                    None => None,
                };
                let (dim, alpha) = (as_f64(args.get("conv_dim")), as_f64(args.get("conv_alpha")));
                if let Some(dim) = dim.filter(|d| *d > 0.0) {
                    args.insert("conv_dim".into(), opts.conv_rank.to_string().into());
                    if let Some(alpha) = alpha {
                        let new_alpha = alpha / dim * opts.conv_rank as f64;
                        args.insert("conv_alpha".into(), py_float(new_alpha).into());
                    }
                    metadata.insert(
                        "ss_network_args".into(),
                        serde_json::Value::Object(args).to_string(),
                    );
                }
            }
            format!("dimension is resized from {old} to {}{conv}", opts.rank)
        }
        rule => {
            metadata.insert("ss_network_dim".into(), "Dynamic".into());
            metadata.insert("ss_network_alpha".into(), "Dynamic".into());
            format!("Dynamic resize with {rule} from {old}")
        }
    };
    metadata.insert(
        "ss_training_comment".into(),
        if comment.is_empty() {
            note
        } else {
            format!("{note}; {comment}")
        },
    );
}

/// Power iterations of the randomized SVD used by [`adapter_from_delta`].
const POWER_ITERATIONS: usize = 4;
/// Extra sketch columns of the randomized SVD.
const OVERSAMPLE: i64 = 16;

/// The leading `k` singular triplets of `a` `[m, n]`: `(U [m, k], S [k], Vh [k, n])`.
/// Exact (thin SVD) for small matrices; otherwise a randomized range finder
/// (Halko–Martinsson–Tropp, as `torch.svd_lowrank`) with a deterministic
/// sketch, so the result does not depend on (or disturb) the global RNG.
pub fn leading_svd(a: &Tensor, k: i64) -> Result<(Tensor, Tensor, Tensor)> {
    let fail = |e: tch::TchError| LoraError::Invalid(format!("SVD: {e}"));
    let (m, n) = a.size2().map_err(fail)?;
    let k = k.clamp(1, m.min(n));
    let q = (k + OVERSAMPLE).min(m.min(n));
    if m.min(n) <= 4 * q {
        let (u, s, v) = a.f_svd(true, true).map_err(fail)?;
        return Ok((u.narrow(1, 0, k), s.narrow(0, 0, k), v.narrow(1, 0, k).tr()));
    }
    // a fixed pseudo-random sketch (fract(sin(i)·43758.55), centred)
    let sketch =
        (Tensor::arange(n * q, (Kind::Double, a.device())) * 12.9898 + 78.233).sin() * 43758.5453;
    let sketch = (&sketch - sketch.floor() - 0.5)
        .to_kind(a.kind())
        .reshape([n, q]);
    let orth = |t: Tensor| {
        Tensor::f_linalg_qr(&t, "reduced")
            .map(|(q, _)| q)
            .map_err(fail)
    };
    let mut basis = orth(a.matmul(&sketch))?;
    for _ in 0..POWER_ITERATIONS {
        let z = orth(a.tr().matmul(&basis))?;
        basis = orth(a.matmul(&z))?;
    }
    let b = basis.tr().matmul(a);
    let (ub, s, v) = b.f_svd(true, true).map_err(fail)?;
    let u = basis.matmul(&ub);
    Ok((u.narrow(1, 0, k), s.narrow(0, 0, k), v.narrow(1, 0, k).tr()))
}

/// A LoRA approximating a weight difference `delta` (`[out, in]` or
/// `[out, in, kh, kw]`, the fine-tuned minus the base weight) at rank ≤
/// `rank`, as kohya's `extract_lora_from_models.py` builds it: leading
/// singular vectors, `σ` in `lora_up`, alpha = rank (scale 1), and — when
/// `clamp_quantile` is given (kohya's default 0.99) — every value of `up`
/// and `down` clamped to ± that quantile of their values. `geometry` is
/// the base layer's (conv stride/padding kept). The stats' `old_rank` is
/// the full rank `min(out, in·kh·kw)`.
pub fn adapter_from_delta(
    delta: &Tensor,
    rank: i64,
    geometry: Geometry,
    clamp_quantile: Option<f64>,
) -> Result<(LoraAdapter, ResizeStats)> {
    if rank < 1 {
        return Err(LoraError::Invalid(format!(
            "the rank must be at least 1, got {rank}"
        )));
    }
    if let Some(q) = clamp_quantile {
        if !(q > 0.0 && q <= 1.0) {
            return Err(LoraError::Invalid(format!(
                "clamp quantile must be in (0, 1], got {q}"
            )));
        }
    }
    let shape = delta.size();
    let out = shape[0];
    let mat = delta.detach().to_kind(Kind::Float).reshape([out, -1]);
    let full = mat.size()[1].min(out);
    let (u, s, vh) = leading_svd(&mat, rank)?;
    let k = s.size()[0];
    let total_sq = mat.square().sum(Kind::Double).double_value(&[]);
    let kept_sq = s
        .to_kind(Kind::Double)
        .square()
        .sum(Kind::Double)
        .double_value(&[]);
    let mut up = u * s.unsqueeze(0);
    let mut down = vh;
    if let Some(q) = clamp_quantile.filter(|&q| q < 1.0) {
        let all = Tensor::cat(&[up.flatten(0, -1), down.flatten(0, -1)], 0);
        let hi = all.quantile_scalar(q, None, false, "linear");
        let lo = -&hi;
        up = up.clamp_tensor(Some(&lo), Some(&hi));
        down = down.clamp_tensor(Some(&lo), Some(&hi));
    }
    let (down, up) = match geometry {
        Geometry::Linear => (down, up),
        Geometry::Conv2d { kernel, .. } => (
            down.reshape([k, shape[1], kernel[0], kernel[1]]),
            up.reshape([out, k, 1, 1]),
        ),
    };
    let mut a = LoraAdapter::from_weights(down.contiguous(), up.contiguous(), Some(k as f64))?;
    if let Geometry::Conv2d {
        stride,
        padding,
        dilation,
        ..
    } = geometry
    {
        a.set_conv_params(stride, padding, dilation)?;
    }
    let stats = ResizeStats {
        old_rank: full,
        new_rank: k,
        fro_retained: if total_sq > 0.0 {
            (kept_sq / total_sq).sqrt().min(1.0)
        } else {
            1.0
        },
        sum_retained: None,
    };
    Ok((a, stats))
}

/// Mean and standard deviation of the retained Frobenius fraction.
pub fn fro_retained_summary(stats: &[(ModuleKey, ResizeStats)]) -> (f64, f64) {
    let n = stats.len().max(1) as f64;
    let mean = stats.iter().map(|(_, s)| s.fro_retained).sum::<f64>() / n;
    let var = stats
        .iter()
        .map(|(_, s)| (s.fro_retained - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::Component;
    use tch::Device;

    fn random(in_f: i64, out: i64, rank: i64, alpha: f64, geometry: Geometry) -> LoraAdapter {
        let mut a = LoraAdapter::new(
            in_f,
            out,
            rank,
            Some(alpha),
            geometry,
            Kind::Float,
            Device::Cpu,
        )
        .unwrap();
        let up = Tensor::randn(
            a.up().unwrap().size().as_slice(),
            (Kind::Float, Device::Cpu),
        );
        a.set_weights(a.down().unwrap().shallow_clone(), up)
            .unwrap();
        a
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs().max().double_value(&[])
    }

    /// ΔW as a matrix `[out, in·kh·kw]`.
    fn matrix(a: &LoraAdapter) -> Tensor {
        let d = a.delta_weight();
        let out = d.size()[0];
        d.reshape([out, -1])
    }

    #[test]
    fn full_rank_keeps_the_delta_geometry_and_scale() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(0);
        let strided = Geometry::Conv2d {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
            dilation: [1, 1],
        };
        for (a, max) in [
            (random(20, 12, 6, 3.0, Geometry::Linear), 6),
            (random(20, 12, 6, 3.0, Geometry::Linear), 64),
            (random(8, 10, 4, 8.0, strided), 4),
            (random(8, 10, 4, 4.0, Geometry::conv(1, 1)), 4),
        ] {
            let (b, st) = resize_adapter(&a, max, RankRule::Fixed).unwrap();
            assert_eq!(b.rank(), a.rank(), "never above the current rank");
            assert_eq!(st.new_rank, a.rank());
            assert_eq!(b.geometry(), a.geometry());
            assert!((b.scale() - a.scale()).abs() < 1e-12);
            assert_eq!(b.down().unwrap().size()[1..], a.down().unwrap().size()[1..]);
            let d = max_abs(&(a.delta_weight() - b.delta_weight())) / max_abs(&a.delta_weight());
            assert!(d < 1e-5, "ΔW changed by {d:.2e}");
            assert!((st.fro_retained - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn truncation_is_the_best_rank_k_approximation() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(1);
        for a in [
            random(40, 24, 8, 4.0, Geometry::Linear),
            random(6, 16, 8, 8.0, Geometry::conv(3, 3)),
        ] {
            let full = matrix(&a).to_kind(Kind::Double);
            let (u, s, v) = full.svd(true, true);
            let sv = Vec::<f64>::try_from(&s).unwrap();
            for k in [1i64, 3, 5] {
                let (b, st) = resize_adapter(&a, k, RankRule::Fixed).unwrap();
                assert_eq!(b.rank(), k);
                let best = (u.narrow(1, 0, k) * s.narrow(0, 0, k).unsqueeze(0))
                    .matmul(&v.narrow(1, 0, k).tr());
                let got = matrix(&b).to_kind(Kind::Double);
                let d = max_abs(&(got - &best)) / max_abs(&full);
                assert!(d < 1e-5, "rank {k}: {d:.2e} from the truncated SVD");
                let kept: f64 = sv[..k as usize].iter().map(|x| x * x).sum();
                let all: f64 = sv.iter().map(|x| x * x).sum();
                assert!((st.fro_retained - (kept / all).sqrt()).abs() < 1e-6);
                assert!(st.fro_retained < 1.0 && st.sum_retained.unwrap() < 1.0);
            }
        }
    }

    #[test]
    fn dynamic_rules_choose_ranks_as_kohya() {
        let _rng = crate::test_rng_lock();
        let s = [8.0, 4.0, 2.0, 1.0, 0.5];
        // σ > 8/5 = 1.6 → 3 values
        assert_eq!(RankRule::SvRatio(5.0).rank_for(&s), 3);
        assert_eq!(RankRule::SvRatio(1.0).rank_for(&s), 1);
        // Σσ² fractions .751 .938 …, target .9² = .81 → 2
        assert_eq!(RankRule::SvFro(0.9).rank_for(&s), 2);
        assert_eq!(RankRule::SvFro(1.0).rank_for(&s), 5);
        // Σσ fractions .516 .774 .903 …, target .9 → 3
        assert_eq!(RankRule::SvCumulative(0.9).rank_for(&s), 3);
        assert_eq!(RankRule::Fixed.rank_for(&s), 5);

        // an adapter built with exactly those singular values (scale 1)
        tch::manual_seed(2);
        let opts = (Kind::Double, Device::Cpu);
        let (qu, _) = Tensor::linalg_qr(&Tensor::randn([12, 5], opts), "reduced");
        let (qv, _) = Tensor::linalg_qr(&Tensor::randn([20, 5], opts), "reduced");
        let sv = Tensor::from_slice(&s).to_kind(Kind::Double);
        let up = (qu * sv.unsqueeze(0)).to_kind(Kind::Float);
        let down = qv.tr().to_kind(Kind::Float).contiguous();
        let a = LoraAdapter::from_weights(down, up, Some(5.0)).unwrap();
        let (b, st) = resize_adapter(&a, 16, RankRule::SvFro(0.9)).unwrap();
        assert_eq!((b.rank(), st.new_rank), (2, 2));
        assert!((st.fro_retained - (80.0f64 / 85.25).sqrt()).abs() < 1e-6);
        assert!((st.sum_retained.unwrap() - 12.0 / 15.5).abs() < 1e-6);
        assert_eq!(b.alpha(), 2.0, "scale 1 kept: alpha = new rank");
        // the maximum still caps a dynamic rule
        let (c, _) = resize_adapter(&a, 1, RankRule::SvCumulative(0.99)).unwrap();
        assert_eq!(c.rank(), 1);
    }

    #[test]
    fn empty_adapter_becomes_rank_one_and_bad_options_are_errors() {
        let _rng = crate::test_rng_lock();
        let a =
            LoraAdapter::new(8, 8, 4, None, Geometry::Linear, Kind::Float, Device::Cpu).unwrap();
        let (b, st) = resize_adapter(&a, 4, RankRule::SvFro(0.9)).unwrap();
        assert_eq!(b.rank(), 1);
        assert_eq!(st.fro_retained, 1.0);
        assert_eq!(max_abs(&b.delta_weight()), 0.0);
        assert!(resize_adapter(&a, 0, RankRule::Fixed).is_err());
        assert!(resize_adapter(&a, 2, RankRule::SvFro(1.5)).is_err());
    }

    #[test]
    fn rules_parse_and_print() {
        let _rng = crate::test_rng_lock();
        for s in ["fixed", "sv_ratio:4", "sv_cumulative:0.9", "sv_fro:0.95"] {
            assert_eq!(RankRule::parse(s).unwrap().to_string(), s);
        }
        for bad in [
            "sv_fro",
            "sv_fro:x",
            "sv_fro:1.5",
            "sv_ratio:0.5",
            "svd:0.9",
        ] {
            let e = RankRule::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn sets_use_the_conv_rank_for_kxk_convs_and_metadata_says_so() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(3);
        let mut set = LoraSet::new();
        let lin = ModuleKey::new(Component::Unet, "middle_block.1.proj_in");
        let one = ModuleKey::new(Component::Unet, "input_blocks.4.0.skip_connection");
        let conv = ModuleKey::new(Component::Unet, "input_blocks.1.0.in_layers.2");
        set.insert(lin.clone(), random(16, 16, 8, 8.0, Geometry::Linear));
        set.insert(one.clone(), random(16, 32, 8, 8.0, Geometry::conv(1, 1)));
        set.insert(conv.clone(), random(16, 16, 8, 4.0, Geometry::conv(3, 3)));
        let opts = ResizeOptions {
            rank: 4,
            conv_rank: 2,
            rule: RankRule::Fixed,
        };
        let (out, stats) = resize_set(&set, &opts).unwrap();
        assert_eq!(out.get(&lin).unwrap().rank(), 4);
        assert_eq!(out.get(&one).unwrap().rank(), 4);
        assert_eq!(out.get(&conv).unwrap().rank(), 2);
        assert_eq!(out.get(&conv).unwrap().alpha(), 1.0);
        assert_eq!(stats.len(), 3);
        let mut meta = BTreeMap::from([
            ("ss_network_dim".to_string(), "8".to_string()),
            ("ss_network_alpha".to_string(), "8.0".to_string()),
            ("ss_training_comment".to_string(), "first run".to_string()),
            (
                "ss_network_args".to_string(),
                r#"{"conv_dim":"8","conv_alpha":"4.0","dropout":null}"#.to_string(),
            ),
        ]);
        note_resize(&mut meta, &opts, &stats);
        assert_eq!(meta["ss_network_dim"], "4");
        assert_eq!(meta["ss_network_alpha"], "4.0");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!(args["conv_dim"], "2");
        assert_eq!(args["conv_alpha"], "1.0");
        assert!(args["dropout"].is_null(), "other args kept");
        assert_eq!(
            meta["ss_training_comment"],
            "dimension is resized from 8 to 4 (conv: 2); first run"
        );
        let dynamic = ResizeOptions {
            rule: RankRule::SvFro(0.9),
            ..opts
        };
        note_resize(&mut meta, &dynamic, &stats);
        assert_eq!(meta["ss_network_dim"], "Dynamic");
        assert!(meta["ss_training_comment"].starts_with("Dynamic resize with sv_fro:0.9 from 8"));
    }

    /// `Q·diag(σ)·Pᵀ` with orthonormal `Q [m, r]`, `P [n, r]`.
    fn with_spectrum(m: i64, n: i64, sigma: &[f64]) -> Tensor {
        let r = sigma.len() as i64;
        let opts = (Kind::Double, Device::Cpu);
        let (q, _) = Tensor::linalg_qr(&Tensor::randn([m, r], opts), "reduced");
        let (p, _) = Tensor::linalg_qr(&Tensor::randn([n, r], opts), "reduced");
        (q * Tensor::from_slice(sigma).unsqueeze(0))
            .matmul(&p.tr())
            .to_kind(Kind::Float)
    }

    #[test]
    fn extraction_recovers_a_low_rank_difference() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(4);
        // large enough for the randomized path (min dim > 4·(k + oversample))
        let delta = with_spectrum(200, 300, &[3.0, 2.0, 0.5]);
        let (a, st) = adapter_from_delta(&delta, 8, Geometry::Linear, None).unwrap();
        assert_eq!(a.rank(), 8);
        assert_eq!(a.alpha(), 8.0);
        assert_eq!(st.old_rank, 200);
        let d = max_abs(&(a.delta_weight() - &delta)) / max_abs(&delta);
        assert!(d < 1e-4, "ΔW recovered to {d:.1e}");
        assert!((st.fro_retained - 1.0).abs() < 1e-5);
        // a conv difference keeps the conv geometry
        let strided = Geometry::Conv2d {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
            dilation: [1, 1],
        };
        let conv = with_spectrum(16, 8 * 9, &[1.0, 0.25]).reshape([16, 8, 3, 3]);
        let (c, _) = adapter_from_delta(&conv, 4, strided, None).unwrap();
        assert_eq!(c.geometry(), strided);
        assert_eq!(c.down().unwrap().size(), vec![4, 8, 3, 3]);
        let d = max_abs(&(c.delta_weight() - &conv)) / max_abs(&conv);
        assert!(d < 1e-4, "conv ΔW recovered to {d:.1e}");
    }

    #[test]
    fn randomized_svd_is_near_optimal_on_a_full_rank_difference() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(5);
        let sigma: Vec<f64> = (0..200).map(|i| 0.95f64.powi(i)).collect();
        let delta = with_spectrum(200, 320, &sigma);
        for k in [4i64, 16, 32] {
            let (a, st) = adapter_from_delta(&delta, k, Geometry::Linear, None).unwrap();
            let err = (a.delta_weight() - &delta)
                .square()
                .sum(Kind::Double)
                .double_value(&[])
                .sqrt();
            let optimal = sigma[k as usize..]
                .iter()
                .map(|s| s * s)
                .sum::<f64>()
                .sqrt();
            assert!(
                err <= optimal * 1.01,
                "rank {k}: error {err} vs optimal {optimal}"
            );
            let kept = (1.0 - optimal.powi(2) / sigma.iter().map(|s| s * s).sum::<f64>()).sqrt();
            assert!(
                (st.fro_retained - kept).abs() < 1e-3,
                "{} vs {kept}",
                st.fro_retained
            );
        }
    }

    #[test]
    fn extraction_clamps_at_the_quantile_and_handles_zero() {
        let _rng = crate::test_rng_lock();
        tch::manual_seed(6);
        let delta = with_spectrum(24, 40, &[4.0, 1.0, 0.5, 0.1]);
        let (a, _) = adapter_from_delta(&delta, 4, Geometry::Linear, None).unwrap();
        let (b, _) = adapter_from_delta(&delta, 4, Geometry::Linear, Some(0.9)).unwrap();
        let (c, _) = adapter_from_delta(&delta, 4, Geometry::Linear, Some(1.0)).unwrap();
        let all = |x: &LoraAdapter| {
            Tensor::cat(
                &[
                    x.up().unwrap().flatten(0, -1),
                    x.down().unwrap().flatten(0, -1),
                ],
                0,
            )
        };
        let hi = all(&a)
            .quantile_scalar(0.9, None, false, "linear")
            .double_value(&[]);
        assert!(max_abs(&all(&b)) <= hi + 1e-6);
        assert!(max_abs(&all(&a)) > hi, "something was clamped");
        assert!(all(&a).equal(&all(&c)), "quantile 1 clamps nothing");
        let (z, st) = adapter_from_delta(
            &Tensor::zeros([8, 8], (Kind::Float, Device::Cpu)),
            2,
            Geometry::Linear,
            None,
        )
        .unwrap();
        assert_eq!(max_abs(&z.delta_weight()), 0.0);
        assert_eq!(st.fro_retained, 1.0);
        assert!(adapter_from_delta(&delta, 0, Geometry::Linear, None).is_err());
        assert!(adapter_from_delta(&delta, 2, Geometry::Linear, Some(1.5)).is_err());
    }
}
