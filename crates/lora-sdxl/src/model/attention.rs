//! SDXL's `SpatialTransformer` (diffusers `Transformer2DModel` with linear
//! projections): GroupNorm(32, 1e-6) → proj_in → N × [self-attention,
//! cross-attention, GEGLU feed-forward] → proj_out, + residual.

use crate::model::nn::{GroupNorm, LayerNorm, Linear, Slots};
use crate::model::weights::VarBuilder;
use lora_core::{Component, ModuleKey};
use tch::Tensor;

/// Multi-head attention with `scaled_dot_product_attention`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
}

fn unet_key(vb: &VarBuilder, s: &str) -> ModuleKey {
    ModuleKey::new(Component::Unet, format!("{}.{s}", vb.module_path()))
}

impl Attention {
    /// `to_q/k/v` (no bias) and `to_out.0`; `ctx_dim` = query dim for self-attention.
    pub fn new(vb: &VarBuilder, slots: &Slots, dim: i64, ctx_dim: i64, heads: i64) -> Self {
        let l = |n: &str, i, o, bias| {
            Linear::new(&vb.pp(n), i, o, bias).with_slot(slots, unet_key(vb, n))
        };
        Self {
            to_q: l("to_q", dim, dim, false),
            to_k: l("to_k", ctx_dim, dim, false),
            to_v: l("to_v", ctx_dim, dim, false),
            to_out: l("to_out.0", dim, dim, true),
            heads,
        }
    }

    /// `x` `[B, N, C]`, `ctx` `[B, M, D]` (or `x` itself).
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>) -> Tensor {
        let ctx = ctx.unwrap_or(x);
        let (b, n, c) = x.size3().expect("attention input is [B, N, C]");
        let split = |t: Tensor| {
            let m = t.size()[1];
            t.view([b, m, self.heads, c / self.heads]).transpose(1, 2)
        };
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(ctx));
        let v = split(self.to_v.forward(ctx));
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        self.to_out.forward(&o.transpose(1, 2).reshape([b, n, c]))
    }
}

/// GEGLU feed-forward: `ff.net.0.proj` (c → 8c), gate with GELU, `ff.net.2` (4c → c).
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    /// Loads `ff.net.0.proj` and `ff.net.2` under `vb` (= `<block>.ff`).
    pub fn new(vb: &VarBuilder, slots: &Slots, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj: Linear::new(&vb.pp("net.0.proj"), dim, 2 * inner, true)
                .with_slot(slots, unet_key(vb, "net.0.proj")),
            out: Linear::new(&vb.pp("net.2"), inner, dim, true)
                .with_slot(slots, unet_key(vb, "net.2")),
        }
    }
    /// Forward: value half × GELU(gate half).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj.forward(x);
        let parts = h.chunk(2, -1);
        self.out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}

/// One `BasicTransformerBlock`.
#[derive(Debug)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    /// Loads a block with `heads` heads of `dim / heads` channels.
    pub fn new(vb: &VarBuilder, slots: &Slots, dim: i64, ctx_dim: i64, heads: i64) -> Self {
        Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, 1e-5),
            attn1: Attention::new(&vb.pp("attn1"), slots, dim, dim, heads),
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, 1e-5),
            attn2: Attention::new(&vb.pp("attn2"), slots, dim, ctx_dim, heads),
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, 1e-5),
            ff: FeedForward::new(&vb.pp("ff"), slots, dim),
        }
    }
    /// Forward.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(ctx)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// `SpatialTransformer` with linear `proj_in` / `proj_out`.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    /// Loads a transformer of `depth` blocks over `dim` channels.
    pub fn new(
        vb: &VarBuilder,
        slots: &Slots,
        dim: i64,
        ctx_dim: i64,
        depth: i64,
        heads: i64,
        groups: i64,
    ) -> Self {
        Self {
            norm: GroupNorm::new(&vb.pp("norm"), groups, dim, 1e-6),
            proj_in: Linear::new(&vb.pp("proj_in"), dim, dim, true)
                .with_slot(slots, unet_key(vb, "proj_in")),
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        &vb.pp(format!("transformer_blocks.{i}")),
                        slots,
                        dim,
                        ctx_dim,
                        heads,
                    )
                })
                .collect(),
            proj_out: Linear::new(&vb.pp("proj_out"), dim, dim, true)
                .with_slot(slots, unet_key(vb, "proj_out")),
        }
    }
    /// `x` `[B, C, H, W]`, `ctx` `[B, M, D]`.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("transformer input is [B, C, H, W]");
        let mut t = self
            .norm
            .forward(x)
            .permute([0, 2, 3, 1])
            .reshape([b, h * w, c]);
        t = self.proj_in.forward(&t);
        for blk in &self.blocks {
            t = blk.forward(&t, ctx);
        }
        t = self.proj_out.forward(&t);
        t.reshape([b, h, w, c]).permute([0, 3, 1, 2]) + x
    }
}
