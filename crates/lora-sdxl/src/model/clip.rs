//! The two SDXL text encoders: CLIP ViT-L/14 (HF names under
//! `conditioner.embedders.0.transformer.text_model.`) and OpenCLIP ViT-bigG/14
//! (OpenCLIP names under `conditioner.embedders.1.model.`, fused `in_proj`,
//! `text_projection` applied as `x·P`). Both expose HF-style module paths for
//! their LoRA slots (`text_model.encoder.layers.N.self_attn.q_proj`, …).

use crate::model::config::{ClipConfig, ClipLayout};
use crate::model::grad_checkpoint::{Checkpointing, Recompute};
use crate::model::nn::{LayerNorm, Linear, Slots};
use crate::model::weights::VarBuilder;
use lora_core::{Component, ModuleKey};
use tch::{Kind, Tensor};

/// Which activation the MLP uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(1.702x)` (CLIP ViT-L).
    QuickGelu,
    /// Exact GELU (OpenCLIP bigG).
    Gelu,
}

#[derive(Debug)]
struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    activation: Activation,
}

impl Layer {
    /// One pre-LN transformer layer with causal self-attention: `[B, L, h]` → same.
    // `x + …` rather than `+=`: the caller may hold a view of `x`
    // (`penultimate`), which an in-place add would overwrite (and autograd
    // forbids it).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, l, h) = x.size3().expect("[B, L, h]");
        let y = self.ln1.forward(x);
        let split = |t: Tensor| t.view([b, l, self.heads, h / self.heads]).transpose(1, 2);
        let q = split(self.q.forward(&y));
        let k = split(self.k.forward(&y));
        let v = split(self.v.forward(&y));
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            true,
            None,
            false,
        );
        let x = x + self.out.forward(&a.transpose(1, 2).reshape([b, l, h]));
        let y = self.fc1.forward(&self.ln2.forward(&x));
        let y = match self.activation {
            Activation::QuickGelu => &y * (&y * 1.702).sigmoid(),
            Activation::Gelu => y.gelu("none"),
        };
        x + self.fc2.forward(&y)
    }
}

impl Recompute for Layer {
    fn run(&self, i: &[Tensor]) -> Tensor {
        self.forward(&i[0])
    }
}

/// Outputs of a text encoder for one batch of token ids.
#[derive(Debug)]
pub struct ClipOutput {
    /// Penultimate hidden state (input to the last layer), no final LayerNorm: `[B, L, h]`.
    pub penultimate: Tensor,
    /// Final-LN hidden state at the first EOS token, projected when the model has a projection: `[B, p]`.
    pub pooled: Tensor,
}

/// A CLIP text transformer.
#[derive(Debug)]
pub struct ClipTextModel {
    /// Its configuration.
    pub config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    /// `[h, p]`, applied as `x·P`.
    projection: Option<Tensor>,
    /// Recompute each layer's activations in backward instead of keeping them.
    checkpointing: Checkpointing,
}

fn slot_linear(vb: &VarBuilder, slots: &Slots, c: Component, path: &str, i: i64, o: i64) -> Linear {
    Linear::new(vb, i, o, true).with_slot(slots, ModuleKey::new(c, path))
}

impl ClipTextModel {
    /// Builds the encoder from `vb` (scoped at `conditioner.embedders.0.transformer`
    /// for HF, `conditioner.embedders.1.model` for OpenCLIP).
    pub fn new(
        vb: &VarBuilder,
        cfg: &ClipConfig,
        layout: ClipLayout,
        activation: Activation,
        component: Component,
        slots: &Slots,
    ) -> Self {
        let h = cfg.hidden;
        let hf_path = |n: i64, s: &str| format!("text_model.encoder.layers.{n}.{s}");
        let (token_embedding, position_embedding, final_ln, projection);
        let mut layers = Vec::new();
        match layout {
            ClipLayout::HuggingFace => {
                let tm = vb.pp("text_model");
                token_embedding = tm.get("embeddings.token_embedding.weight", &[cfg.vocab_size, h]);
                position_embedding = tm.get(
                    "embeddings.position_embedding.weight",
                    &[cfg.max_positions, h],
                );
                for n in 0..cfg.layers {
                    let l = tm.pp(format!("encoder.layers.{n}"));
                    let lin = |s: &str, i, o| {
                        slot_linear(&l.pp(s), slots, component, &hf_path(n, s), i, o)
                    };
                    layers.push(Layer {
                        ln1: LayerNorm::new(&l.pp("layer_norm1"), h, 1e-5),
                        q: lin("self_attn.q_proj", h, h),
                        k: lin("self_attn.k_proj", h, h),
                        v: lin("self_attn.v_proj", h, h),
                        out: lin("self_attn.out_proj", h, h),
                        ln2: LayerNorm::new(&l.pp("layer_norm2"), h, 1e-5),
                        fc1: lin("mlp.fc1", h, cfg.intermediate),
                        fc2: lin("mlp.fc2", cfg.intermediate, h),
                        heads: cfg.heads,
                        activation,
                    });
                }
                final_ln = LayerNorm::new(&tm.pp("final_layer_norm"), h, 1e-5);
                projection = cfg
                    .projection_dim
                    .map(|p| vb.get("text_projection.weight", &[p, h]).tr());
            }
            ClipLayout::OpenClip => {
                token_embedding = vb.get("token_embedding.weight", &[cfg.vocab_size, h]);
                position_embedding = vb.get("positional_embedding", &[cfg.max_positions, h]);
                for n in 0..cfg.layers {
                    let l = vb.pp(format!("transformer.resblocks.{n}"));
                    let w = l.get("attn.in_proj_weight", &[3 * h, h]);
                    let b = l.get("attn.in_proj_bias", &[3 * h]);
                    let part = |i: i64, s: &str| {
                        Linear::from_tensors(
                            w.narrow(0, i * h, h).contiguous(),
                            Some(b.narrow(0, i * h, h).contiguous()),
                        )
                        .with_slot(slots, ModuleKey::new(component, hf_path(n, s)))
                    };
                    let lin = |src: &str, s: &str, i, o| {
                        slot_linear(&l.pp(src), slots, component, &hf_path(n, s), i, o)
                    };
                    layers.push(Layer {
                        ln1: LayerNorm::new(&l.pp("ln_1"), h, 1e-5),
                        q: part(0, "self_attn.q_proj"),
                        k: part(1, "self_attn.k_proj"),
                        v: part(2, "self_attn.v_proj"),
                        out: lin("attn.out_proj", "self_attn.out_proj", h, h),
                        ln2: LayerNorm::new(&l.pp("ln_2"), h, 1e-5),
                        fc1: lin("mlp.c_fc", "mlp.fc1", h, cfg.intermediate),
                        fc2: lin("mlp.c_proj", "mlp.fc2", cfg.intermediate, h),
                        heads: cfg.heads,
                        activation,
                    });
                }
                final_ln = LayerNorm::new(&vb.pp("ln_final"), h, 1e-5);
                projection = cfg
                    .projection_dim
                    .map(|p| vb.get("text_projection", &[h, p]));
            }
        }
        Self {
            config: cfg.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            projection,
            checkpointing: Checkpointing::default(),
        }
    }

    /// Gradient checkpointing: each transformer layer keeps no activations in
    /// the forward and is recomputed in backward. Only matters while the
    /// encoder is trained (its forward runs with gradients); off by default.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.set(on);
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.is_on()
    }

    /// Device the weights live on.
    pub fn config_device(&self) -> tch::Device {
        self.token_embedding.device()
    }

    /// The EOS token id (the last vocabulary entry: 49407 for CLIP's vocabulary).
    pub fn eos_id(&self) -> i64 {
        self.config.vocab_size - 1
    }

    /// Encodes token ids `[B, L]` (L ≤ max positions).
    pub fn forward(&self, ids: &Tensor) -> ClipOutput {
        let (b, l) = ids.size2().expect("ids are [B, L]");
        let h = self.config.hidden;
        let mut x = self
            .token_embedding
            .index_select(0, &ids.reshape([-1]))
            .view([b, l, h])
            + self.position_embedding.narrow(0, 0, l).unsqueeze(0);
        let mut penultimate = x.shallow_clone();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = x.shallow_clone();
            }
            x = if self.checkpointing.is_on() {
                self.checkpointing.run(layer, &[&x], "text encoder layer")
            } else {
                layer.forward(&x)
            };
        }
        if n == 0 {
            penultimate = x.shallow_clone();
        }
        let last = self.final_ln.forward(&x);
        // first EOS position per row (0 when absent)
        let is_eos = ids.eq(self.eos_id()).to_kind(Kind::Int64);
        let pos = (is_eos.cumsum(1, Kind::Int64).eq(0))
            .to_kind(Kind::Int64)
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Int64);
        let pos = pos.where_self(&pos.lt(l), &pos.zeros_like());
        let pooled = last
            .gather(1, &pos.view([b, 1, 1]).expand([b, 1, h], false), false)
            .squeeze_dim(1);
        let pooled = match &self.projection {
            Some(p) => pooled.matmul(p),
            None => pooled,
        };
        ClipOutput {
            penultimate,
            pooled,
        }
    }
}
