//! The SDXL VAE with LDM names (`first_stage_model.encoder…`, `decoder…`,
//! `quant_conv`, `post_quant_conv`). GroupNorm(32, 1e-6), single-head
//! mid-block attention with 1x1-conv (or linear) q/k/v.

use crate::model::config::VaeConfig;
use crate::model::nn::{Conv2d, GroupNorm};
use crate::model::weights::VarBuilder;
use tch::{Kind, Tensor};

#[derive(Debug)]
struct VaeRes {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl VaeRes {
    fn new(vb: &VarBuilder, cin: i64, cout: i64) -> Self {
        Self {
            norm1: GroupNorm::new(&vb.pp("norm1"), 32, cin, 1e-6),
            conv1: Conv2d::new(&vb.pp("conv1"), cin, cout, 3, 1, 1),
            norm2: GroupNorm::new(&vb.pp("norm2"), 32, cout, 1e-6),
            conv2: Conv2d::new(&vb.pp("conv2"), cout, cout, 3, 1, 1),
            shortcut: (cin != cout)
                .then(|| Conv2d::new(&vb.pp("nin_shortcut"), cin, cout, 1, 1, 0)),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.shortcut {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}

/// 1x1 projection stored as a conv `[C, C, 1, 1]` or a linear `[C, C]`.
#[derive(Debug)]
struct Proj {
    weight: Tensor,
    bias: Tensor,
}

impl Proj {
    fn new(vb: &VarBuilder, c: i64) -> Self {
        let key = vb.key("weight");
        // single files store 1x1 convs, diffusers folders linears; a dry run lists the single-file form
        let conv = vb
            .checkpoint()
            .is_none_or(|c| c.shape(&key).is_some_and(|s| s.len() == 4));
        let weight = if conv {
            vb.get("weight", &[c, c, 1, 1]).view([c, c])
        } else {
            vb.get("weight", &[c, c])
        };
        Self {
            weight,
            bias: vb.get("bias", &[c]),
        }
    }
}

#[derive(Debug)]
struct VaeAttn {
    norm: GroupNorm,
    q: Proj,
    k: Proj,
    v: Proj,
    out: Proj,
}

impl VaeAttn {
    fn new(vb: &VarBuilder, c: i64) -> Self {
        Self {
            norm: GroupNorm::new(&vb.pp("norm"), 32, c, 1e-6),
            q: Proj::new(&vb.pp("q"), c),
            k: Proj::new(&vb.pp("k"), c),
            v: Proj::new(&vb.pp("v"), c),
            out: Proj::new(&vb.pp("proj_out"), c),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("4-D");
        let t = self.norm.forward(x).view([b, c, h * w]).transpose(1, 2); // [B, HW, C]
        let p = |p: &Proj| t.linear(&p.weight, Some(&p.bias)).unsqueeze(1);
        let o = Tensor::scaled_dot_product_attention(
            &p(&self.q),
            &p(&self.k),
            &p(&self.v),
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let o = o
            .squeeze_dim(1)
            .linear(&self.out.weight, Some(&self.out.bias));
        o.transpose(1, 2).view([b, c, h, w]) + x
    }
}

#[derive(Debug)]
struct Mid {
    block_1: VaeRes,
    attn_1: VaeAttn,
    block_2: VaeRes,
}

impl Mid {
    fn new(vb: &VarBuilder, c: i64) -> Self {
        Self {
            block_1: VaeRes::new(&vb.pp("block_1"), c, c),
            attn_1: VaeAttn::new(&vb.pp("attn_1"), c),
            block_2: VaeRes::new(&vb.pp("block_2"), c, c),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.block_2
            .forward(&self.attn_1.forward(&self.block_1.forward(x)))
    }
}

/// The autoencoder.
#[derive(Debug)]
pub struct Vae {
    /// Its configuration.
    pub config: VaeConfig,
    enc_in: Conv2d,
    enc_levels: Vec<(Vec<VaeRes>, Option<Conv2d>)>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_out: Conv2d,
    quant: Conv2d,
    post_quant: Conv2d,
    dec_in: Conv2d,
    dec_mid: Mid,
    /// From the deepest level up.
    dec_levels: Vec<(Vec<VaeRes>, Option<Conv2d>)>,
    dec_norm: GroupNorm,
    dec_out: Conv2d,
}

impl Vae {
    /// Builds the VAE from `vb` scoped at `first_stage_model`.
    pub fn new(vb: &VarBuilder, cfg: &VaeConfig) -> Self {
        let ch = cfg.base_channels;
        let n = cfg.channel_mult.len();
        let lc = cfg.latent_channels;
        let enc = vb.pp("encoder");
        let mut c = ch;
        let mut enc_levels = Vec::new();
        for i in 0..n {
            let out = ch * cfg.channel_mult[i];
            let lvl = enc.pp(format!("down.{i}"));
            let blocks = (0..cfg.num_res_blocks)
                .map(|j| {
                    let b = VaeRes::new(&lvl.pp(format!("block.{j}")), c, out);
                    c = out;
                    b
                })
                .collect();
            let down = (i + 1 < n).then(|| Conv2d::new(&lvl.pp("downsample.conv"), c, c, 3, 2, 0));
            enc_levels.push((blocks, down));
        }
        let top = c;
        let dec = vb.pp("decoder");
        let mut dec_levels = Vec::new();
        let mut c = top;
        for i in (0..n).rev() {
            let out = ch * cfg.channel_mult[i];
            let lvl = dec.pp(format!("up.{i}"));
            let blocks = (0..=cfg.num_res_blocks)
                .map(|j| {
                    let b = VaeRes::new(&lvl.pp(format!("block.{j}")), c, out);
                    c = out;
                    b
                })
                .collect();
            let up = (i > 0).then(|| Conv2d::new(&lvl.pp("upsample.conv"), c, c, 3, 1, 1));
            dec_levels.push((blocks, up));
        }
        Self {
            config: cfg.clone(),
            enc_in: Conv2d::new(&enc.pp("conv_in"), 3, ch, 3, 1, 1),
            enc_levels,
            enc_mid: Mid::new(&enc.pp("mid"), top),
            enc_norm: GroupNorm::new(&enc.pp("norm_out"), 32, top, 1e-6),
            enc_out: Conv2d::new(&enc.pp("conv_out"), top, 2 * lc, 3, 1, 1),
            quant: Conv2d::new(&vb.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0),
            post_quant: Conv2d::new(&vb.pp("post_quant_conv"), lc, lc, 1, 1, 0),
            dec_in: Conv2d::new(&dec.pp("conv_in"), lc, top, 3, 1, 1),
            dec_mid: Mid::new(&dec.pp("mid"), top),
            dec_levels,
            dec_norm: GroupNorm::new(&dec.pp("norm_out"), 32, ch * cfg.channel_mult[0], 1e-6),
            dec_out: Conv2d::new(&dec.pp("conv_out"), ch * cfg.channel_mult[0], 3, 3, 1, 1),
        }
    }

    /// The dtype the encoder computes in.
    pub fn kind(&self) -> tch::Kind {
        self.enc_in.weight.kind()
    }

    /// Encoder moments `(mean, logvar)` of images `[B, 3, H, W]` in `[-1, 1]`
    /// (unscaled latent space).
    pub fn encode_moments(&self, x: &Tensor) -> (Tensor, Tensor) {
        let kind = self.enc_in.weight.kind();
        let mut h = self.enc_in.forward(&x.to_kind(kind));
        for (blocks, down) in &self.enc_levels {
            for b in blocks {
                h = b.forward(&h);
            }
            if let Some(d) = down {
                // LDM pads right/bottom by one before the stride-2 conv.
                h = d.forward(&h.constant_pad_nd([0, 1, 0, 1]));
            }
        }
        h = self.enc_mid.forward(&h);
        h = self.enc_out.forward(&self.enc_norm.forward(&h).silu());
        let m = self.quant.forward(&h);
        let parts = m.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// A sample of the latent distribution (unscaled), using torch's generator.
    pub fn encode_sample(&self, x: &Tensor) -> Tensor {
        let (mean, logvar) = self.encode_moments(x);
        let std = (logvar * 0.5).exp();
        &mean + std * mean.randn_like()
    }

    /// Decodes unscaled latents `[B, 4, h, w]` to images in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let kind = self.dec_in.weight.kind();
        let mut h = self
            .dec_in
            .forward(&self.post_quant.forward(&z.to_kind(kind)));
        h = self.dec_mid.forward(&h);
        for (blocks, up) in &self.dec_levels {
            for b in blocks {
                h = b.forward(&h);
            }
            if let Some(u) = up {
                let (_, _, hh, ww) = h.size4().expect("4-D");
                h = u.forward(&h.upsample_nearest2d([hh * 2, ww * 2], None, None));
            }
        }
        self.dec_out
            .forward(&self.dec_norm.forward(&h).silu())
            .to_kind(Kind::Float)
    }
}
