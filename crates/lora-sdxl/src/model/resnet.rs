//! LDM `ResBlock` (diffusers `ResnetBlock2D`): GroupNorm(32, 1e-5) → SiLU →
//! conv3x3, + time embedding, GroupNorm → SiLU → conv3x3, + skip.

use crate::model::nn::{Conv2d, GroupNorm, Linear, Slots};
use crate::model::weights::VarBuilder;
use lora_core::{Component, ModuleKey};
use tch::Tensor;

/// A residual block with time-embedding input.
#[derive(Debug)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    emb: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    /// Loads `<vb>.in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`.
    pub fn new(
        vb: &VarBuilder,
        slots: &Slots,
        cin: i64,
        cout: i64,
        emb_dim: i64,
        groups: i64,
    ) -> Self {
        let key = |s: &str| ModuleKey::new(Component::Unet, format!("{}.{s}", vb.module_path()));
        Self {
            norm1: GroupNorm::new(&vb.pp("in_layers.0"), groups, cin, 1e-5),
            conv1: Conv2d::new(&vb.pp("in_layers.2"), cin, cout, 3, 1, 1)
                .with_slot(slots, key("in_layers.2")),
            emb: Linear::new(&vb.pp("emb_layers.1"), emb_dim, cout, true)
                .with_slot(slots, key("emb_layers.1")),
            norm2: GroupNorm::new(&vb.pp("out_layers.0"), groups, cout, 1e-5),
            conv2: Conv2d::new(&vb.pp("out_layers.3"), cout, cout, 3, 1, 1)
                .with_slot(slots, key("out_layers.3")),
            skip: (cin != cout).then(|| {
                Conv2d::new(&vb.pp("skip_connection"), cin, cout, 1, 1, 0)
                    .with_slot(slots, key("skip_connection"))
            }),
        }
    }

    /// `x` `[B, C, H, W]`, `emb` `[B, E]`.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        let e = self.emb.forward(&emb.silu()).unsqueeze(-1).unsqueeze(-1);
        let h = h + e;
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.skip {
            Some(s) => s.forward(x) + h,
            None => x + h,
        }
    }
}
