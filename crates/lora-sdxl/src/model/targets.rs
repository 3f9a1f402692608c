//! The modules kohya's `networks.lora` adapts in an SDXL model, enumerated
//! from a config (see `kohya-format.md` §1–2):
//!
//! * UNet, always: every Linear inside each `SpatialTransformer`
//!   (`proj_in`, `proj_out`, attn1/attn2 `to_q/k/v/out.0`, `ff.net.0.proj`, `ff.net.2`);
//! * UNet, LoCon (`conv_dim` set): resnet `in_layers.2`, `emb_layers.1`,
//!   `out_layers.3`, `skip_connection` (when in ≠ out), down-sampler `op`,
//!   up-sampler `conv`;
//! * text encoders: `self_attn.{q,k,v,out}_proj`, `mlp.fc1`, `mlp.fc2` per layer.
//!
//! Order is kohya's module order; SDXL base gives 722 UNet modules (788 with
//! LoCon), 72 for text encoder 1 and 192 for text encoder 2.

use crate::model::config::{ClipConfig, SdxlConfig, UnetConfig};
use lora_core::{Component, Geometry, ModuleKey};

/// One adaptable layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Internal name.
    pub key: ModuleKey,
    /// Input features / channels.
    pub in_features: i64,
    /// Output features / channels.
    pub out_features: i64,
    /// Linear or conv (with the base conv's stride and padding).
    pub geometry: Geometry,
}

impl Target {
    /// True when kohya gives this module the conv rank (kernel ≠ 1x1).
    pub fn uses_conv_rank(&self) -> bool {
        self.geometry.is_spatial_conv()
    }
    /// Shape of the base weight (`[out, in]` or `[out, in, kh, kw]`).
    pub fn weight_shape(&self) -> Vec<i64> {
        match self.geometry {
            Geometry::Linear => vec![self.out_features, self.in_features],
            Geometry::Conv2d { kernel, .. } => {
                vec![self.out_features, self.in_features, kernel[0], kernel[1]]
            }
        }
    }
}

/// Which parts of the model get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetScope {
    /// UNet transformer Linears.
    pub unet: bool,
    /// UNet resnet / sampler convs (LoCon).
    pub unet_conv: bool,
    /// Text encoder 1.
    pub te1: bool,
    /// Text encoder 2.
    pub te2: bool,
}

impl TargetScope {
    /// Everything kohya can adapt (UNet with LoCon, both text encoders).
    pub const ALL: TargetScope = TargetScope {
        unet: true,
        unet_conv: true,
        te1: true,
        te2: true,
    };
    /// UNet transformer Linears only (kohya's default `--network_train_unet_only`).
    pub const UNET: TargetScope = TargetScope {
        unet: true,
        unet_conv: false,
        te1: false,
        te2: false,
    };
}

struct Builder {
    out: Vec<Target>,
}

impl Builder {
    fn linear(&mut self, c: Component, path: String, i: i64, o: i64) {
        self.out.push(Target {
            key: ModuleKey::new(c, path),
            in_features: i,
            out_features: o,
            geometry: Geometry::Linear,
        });
    }
    fn conv(&mut self, path: String, i: i64, o: i64, k: i64, stride: i64) {
        self.out.push(Target {
            key: ModuleKey::new(Component::Unet, path),
            in_features: i,
            out_features: o,
            geometry: Geometry::Conv2d {
                kernel: [k, k],
                stride: [stride, stride],
                padding: [k / 2, k / 2],
                dilation: [1, 1],
            },
        });
    }
    fn resnet(&mut self, u: &UnetConfig, p: &str, i: i64, o: i64) {
        self.conv(format!("{p}.in_layers.2"), i, o, 3, 1);
        self.linear(
            Component::Unet,
            format!("{p}.emb_layers.1"),
            u.time_embed_dim(),
            o,
        );
        self.conv(format!("{p}.out_layers.3"), o, o, 3, 1);
        if i != o {
            self.conv(format!("{p}.skip_connection"), i, o, 1, 1);
        }
    }
    fn transformer(&mut self, u: &UnetConfig, p: &str, c: i64, depth: i64) {
        let l = |b: &mut Self, s: String, i, o| b.linear(Component::Unet, s, i, o);
        l(self, format!("{p}.proj_in"), c, c);
        for t in 0..depth {
            let tb = format!("{p}.transformer_blocks.{t}");
            for q in ["to_q", "to_k", "to_v", "to_out.0"] {
                l(self, format!("{tb}.attn1.{q}"), c, c);
            }
            l(self, format!("{tb}.attn2.to_q"), c, c);
            l(self, format!("{tb}.attn2.to_k"), u.context_dim, c);
            l(self, format!("{tb}.attn2.to_v"), u.context_dim, c);
            l(self, format!("{tb}.attn2.to_out.0"), c, c);
            l(self, format!("{tb}.ff.net.0.proj"), c, 8 * c);
            l(self, format!("{tb}.ff.net.2"), 4 * c, c);
        }
        l(self, format!("{p}.proj_out"), c, c);
    }
}

/// UNet targets: transformer Linears, plus LoCon convs when `conv` is true.
/// (Returned in kohya's order; modules of the unused kind are filtered out.)
pub fn unet_targets(u: &UnetConfig, linear: bool, conv: bool) -> Vec<Target> {
    let mut b = Builder { out: Vec::new() };
    let nrb = u.num_res_blocks;
    let mut skips = vec![u.model_channels];
    let mut ch = u.model_channels;
    for l in 0..u.levels() {
        let out = u.level_channels(l);
        for j in 0..nrb {
            let idx = 1 + l as i64 * (nrb + 1) + j;
            b.resnet(u, &format!("input_blocks.{idx}.0"), ch, out);
            ch = out;
            if u.transformer_depth[l] > 0 {
                b.transformer(
                    u,
                    &format!("input_blocks.{idx}.1"),
                    ch,
                    u.transformer_depth[l],
                );
            }
            skips.push(ch);
        }
        if l + 1 < u.levels() {
            let idx = (l as i64 + 1) * (nrb + 1);
            b.conv(format!("input_blocks.{idx}.0.op"), ch, ch, 3, 2);
            skips.push(ch);
        }
    }
    b.resnet(u, "middle_block.0", ch, ch);
    b.transformer(u, "middle_block.1", ch, u.transformer_depth_middle);
    b.resnet(u, "middle_block.2", ch, ch);
    let mut idx = 0;
    for l in (0..u.levels()).rev() {
        let out = u.level_channels(l);
        for j in 0..=nrb {
            let skip = skips.pop().expect("one skip per input block");
            b.resnet(u, &format!("output_blocks.{idx}.0"), ch + skip, out);
            ch = out;
            let has_attn = u.transformer_depth[l] > 0;
            if has_attn {
                b.transformer(
                    u,
                    &format!("output_blocks.{idx}.1"),
                    ch,
                    u.transformer_depth[l],
                );
            }
            if j == nrb && l > 0 {
                let pos = if has_attn { 2 } else { 1 };
                b.conv(format!("output_blocks.{idx}.{pos}.conv"), ch, ch, 3, 1);
            }
            idx += 1;
        }
    }
    let is_transformer = |t: &Target| {
        // transformer modules live under `<block>.1` of an attention block or `middle_block.1`
        t.key.path.contains(".transformer_blocks.")
            || t.key.path.ends_with(".proj_in")
            || t.key.path.ends_with(".proj_out")
    };
    b.out
        .into_iter()
        .filter(|t| if is_transformer(t) { linear } else { conv })
        .collect()
}

/// Text-encoder targets (HF CLIP paths).
pub fn clip_targets(c: &ClipConfig, component: Component) -> Vec<Target> {
    let mut b = Builder { out: Vec::new() };
    for n in 0..c.layers {
        let p = format!("text_model.encoder.layers.{n}");
        for q in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            b.linear(component, format!("{p}.self_attn.{q}"), c.hidden, c.hidden);
        }
        b.linear(component, format!("{p}.mlp.fc1"), c.hidden, c.intermediate);
        b.linear(component, format!("{p}.mlp.fc2"), c.intermediate, c.hidden);
    }
    b.out
}

/// Every target of `scope` in `cfg`.
pub fn lora_targets(cfg: &SdxlConfig, scope: TargetScope) -> Vec<Target> {
    let mut out = Vec::new();
    if scope.unet || scope.unet_conv {
        out.extend(unet_targets(&cfg.unet, scope.unet, scope.unet_conv));
    }
    if scope.te1 {
        out.extend(clip_targets(&cfg.te1, Component::Te1));
    }
    if scope.te2 {
        out.extend(clip_targets(&cfg.te2, Component::Te2));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_base_counts_match_kohya() {
        let cfg = SdxlConfig::base();
        assert_eq!(unet_targets(&cfg.unet, true, false).len(), 722);
        assert_eq!(unet_targets(&cfg.unet, false, true).len(), 66);
        assert_eq!(unet_targets(&cfg.unet, true, true).len(), 788);
        assert_eq!(clip_targets(&cfg.te1, Component::Te1).len(), 72);
        assert_eq!(clip_targets(&cfg.te2, Component::Te2).len(), 192);
        assert_eq!(lora_targets(&cfg, TargetScope::ALL).len(), 1052);
        // trainable params per unit rank over the transformer modules: 2,659,840
        let per_rank: i64 = unet_targets(&cfg.unet, true, false)
            .iter()
            .map(|t| t.in_features + t.out_features)
            .sum();
        assert_eq!(per_rank, 2_659_840);
    }

    #[test]
    fn tiny_has_same_structure() {
        let cfg = SdxlConfig::tiny();
        let names = |c: &SdxlConfig| -> Vec<String> {
            lora_targets(c, TargetScope::ALL)
                .into_iter()
                .filter(|t| t.key.component == Component::Unet)
                .map(|t| {
                    t.key
                        .path
                        .split(".transformer_blocks")
                        .next()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let mut a = names(&cfg);
        let mut b = names(&SdxlConfig::base());
        a.dedup();
        b.dedup();
        assert_eq!(a, b);
    }
}
