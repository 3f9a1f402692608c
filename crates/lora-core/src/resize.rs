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
#[path = "resize_tests.rs"]
mod tests;
