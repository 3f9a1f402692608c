//! The SDXL UNet with the original LDM module names (`input_blocks`,
//! `middle_block`, `output_blocks`, `time_embed`, `label_emb`, `out`).

use crate::model::attention::SpatialTransformer;
use crate::model::config::UnetConfig;
use crate::model::grad_checkpoint::Checkpointing;
use crate::model::nn::{timestep_embedding, Conv2d, GroupNorm, Linear, Slots};
use crate::model::resnet::ResBlock;
use crate::model::weights::VarBuilder;
use lora_core::{Component, ModuleKey};
use tch::Tensor;

/// SDXL attention heads: 64 channels each (one head below 64 channels).
pub fn heads_for(channels: i64) -> i64 {
    (channels / 64).max(1)
}

#[derive(Debug)]
enum Layer {
    Res(ResBlock),
    Attn(SpatialTransformer),
    Down(Conv2d),
    Up(Conv2d),
}

#[derive(Debug)]
struct Block {
    layers: Vec<Layer>,
}

impl Block {
    fn forward(&self, mut h: Tensor, emb: &Tensor, ctx: &Tensor) -> Tensor {
        for l in &self.layers {
            h = match l {
                Layer::Res(r) => r.forward(&h, emb),
                Layer::Attn(a) => a.forward(&h, ctx),
                Layer::Down(c) => c.forward(&h),
                Layer::Up(c) => {
                    let (_, _, hh, ww) = h.size4().expect("4-D");
                    c.forward(&h.upsample_nearest2d([hh * 2, ww * 2], None, None))
                }
            };
        }
        h
    }
}

impl crate::model::grad_checkpoint::Recompute for Block {
    fn run(&self, i: &[Tensor]) -> Tensor {
        self.forward(i[0].shallow_clone(), &i[1], &i[2])
    }
}

/// The UNet.
#[derive(Debug)]
pub struct Unet {
    /// Its configuration.
    pub config: UnetConfig,
    time1: Linear,
    time2: Linear,
    label1: Linear,
    label2: Linear,
    conv_in: Conv2d,
    input_blocks: Vec<Block>,
    middle: Block,
    output_blocks: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Recompute each block's activations in backward instead of keeping them.
    checkpointing: Checkpointing,
}

impl Unet {
    /// Builds the UNet from `vb` scoped at `model.diffusion_model`; LoRA
    /// slots of every kohya target are registered in `slots`.
    pub fn new(vb: &VarBuilder, cfg: &UnetConfig, slots: &Slots) -> Self {
        let vb = &vb.rooted();
        let mc = cfg.model_channels;
        let ted = cfg.time_embed_dim();
        let g = cfg.norm_groups;
        let nrb = cfg.num_res_blocks;
        let res = |p: &VarBuilder, i, o| Layer::Res(ResBlock::new(p, slots, i, o, ted, g));
        let attn = |p: &VarBuilder, c, d| {
            Layer::Attn(SpatialTransformer::new(
                p,
                slots,
                c,
                cfg.context_dim,
                d,
                heads_for(c),
                g,
            ))
        };
        let conv_key =
            |p: &VarBuilder| ModuleKey::new(Component::Unet, p.module_path().to_string());
        let ib = vb.pp("input_blocks");
        let mut input_blocks = Vec::new();
        let mut skips = vec![mc];
        let mut ch = mc;
        for l in 0..cfg.levels() {
            let out = cfg.level_channels(l);
            for j in 0..nrb {
                let idx = 1 + l as i64 * (nrb + 1) + j;
                let p = ib.pp(idx);
                let mut layers = vec![res(&p.pp(0), ch, out)];
                ch = out;
                if cfg.transformer_depth[l] > 0 {
                    layers.push(attn(&p.pp(1), ch, cfg.transformer_depth[l]));
                }
                input_blocks.push(Block { layers });
                skips.push(ch);
            }
            if l + 1 < cfg.levels() {
                let p = ib.pp((l as i64 + 1) * (nrb + 1)).pp("0.op");
                input_blocks.push(Block {
                    layers: vec![Layer::Down(
                        Conv2d::new(&p, ch, ch, 3, 2, 1).with_slot(slots, conv_key(&p)),
                    )],
                });
                skips.push(ch);
            }
        }
        let mb = vb.pp("middle_block");
        let middle = Block {
            layers: vec![
                res(&mb.pp(0), ch, ch),
                attn(&mb.pp(1), ch, cfg.transformer_depth_middle),
                res(&mb.pp(2), ch, ch),
            ],
        };
        let ob = vb.pp("output_blocks");
        let mut output_blocks = Vec::new();
        let mut idx = 0;
        for l in (0..cfg.levels()).rev() {
            let out = cfg.level_channels(l);
            for j in 0..=nrb {
                let skip = skips.pop().unwrap_or(0);
                let p = ob.pp(idx);
                let mut layers = vec![res(&p.pp(0), ch + skip, out)];
                ch = out;
                let has_attn = cfg.transformer_depth[l] > 0;
                if has_attn {
                    layers.push(attn(&p.pp(1), ch, cfg.transformer_depth[l]));
                }
                if j == nrb && l > 0 {
                    let up = p.pp(if has_attn { 2 } else { 1 }).pp("conv");
                    layers.push(Layer::Up(
                        Conv2d::new(&up, ch, ch, 3, 1, 1).with_slot(slots, conv_key(&up)),
                    ));
                }
                output_blocks.push(Block { layers });
                idx += 1;
            }
        }
        Self {
            config: cfg.clone(),
            time1: Linear::new(&vb.pp("time_embed.0"), mc, ted, true),
            time2: Linear::new(&vb.pp("time_embed.2"), ted, ted, true),
            label1: Linear::new(&vb.pp("label_emb.0.0"), cfg.adm_in_channels, ted, true),
            label2: Linear::new(&vb.pp("label_emb.0.2"), ted, ted, true),
            conv_in: Conv2d::new(&ib.pp("0.0"), cfg.in_channels, mc, 3, 1, 1),
            input_blocks,
            middle,
            output_blocks,
            norm_out: GroupNorm::new(&vb.pp("out.0"), g, ch, 1e-5),
            conv_out: Conv2d::new(&vb.pp("out.2"), ch, cfg.out_channels, 3, 1, 1),
            checkpointing: Checkpointing::default(),
        }
    }

    /// The output conv's weight (for checks that the base stays frozen).
    pub fn conv_out_weight(&self) -> &Tensor {
        &self.conv_out.weight
    }

    /// Device of the weights.
    pub fn device(&self) -> tch::Device {
        self.conv_in.weight.device()
    }

    /// Gradient checkpointing: each input/middle/output block keeps no
    /// activations in the forward and is recomputed in backward (about a
    /// third more compute for much less memory). Off by default.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.set(on);
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.is_on()
    }

    fn block(&self, b: &Block, h: Tensor, emb: &Tensor, ctx: &Tensor) -> Tensor {
        if !self.checkpointing.is_on() {
            return b.forward(h, emb, ctx);
        }
        self.checkpointing.run(b, &[&h, emb, ctx], "UNet block")
    }

    /// ε (or v) prediction for latents `x` `[B, 4, h, w]` at timesteps `t`
    /// `[B]`, with `context` `[B, 77·k, 2048]` and `y` `[B, 2816]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor, y: &Tensor) -> Tensor {
        let kind = self.conv_in.weight.kind();
        let temb = timestep_embedding(t, self.config.model_channels).to_kind(kind);
        let temb = self.time2.forward(&self.time1.forward(&temb).silu());
        let yemb = self
            .label2
            .forward(&self.label1.forward(&y.to_kind(kind)).silu());
        let emb = temb + yemb;
        let ctx = context.to_kind(kind);
        let mut h = self.conv_in.forward(&x.to_kind(kind));
        let mut hs = vec![h.shallow_clone()];
        for b in &self.input_blocks {
            h = self.block(b, h, &emb, &ctx);
            hs.push(h.shallow_clone());
        }
        h = self.block(&self.middle, h, &emb, &ctx);
        for b in &self.output_blocks {
            let skip = hs.pop().expect("one skip per output block");
            h = self.block(b, Tensor::cat(&[h, skip], 1), &emb, &ctx);
        }
        self.conv_out.forward(&self.norm_out.forward(&h).silu())
    }
}

/// SDXL's `y`: pooled text embedding + sinusoidal embeddings (256 each) of
/// the six size/crop ids `[H₀, W₀, top, left, H, W]`.
pub fn vector_conditioning(pooled: &Tensor, time_ids: &Tensor) -> Tensor {
    let b = time_ids.size()[0];
    let e = timestep_embedding(&time_ids.reshape([-1]), 256).reshape([b, -1]);
    Tensor::cat(&[pooled.to_kind(tch::Kind::Float), e], -1)
}
