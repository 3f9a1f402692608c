//! The LoRA under training: one fp32 `down`/`up` pair of leaves per target
//! module (kohya's LoRA / LoCon targets), attached to the model's slots.

use super::blocks::{block_index, BlockPlan};
use super::job::JobConfig;
use crate::error::Result;
use crate::model::sdxl::SdxlModel;
use crate::model::targets::{lora_targets, TargetScope};
use lora_core::{Component, Dropouts, LoraAdapter, LoraSet, ModuleKey};
use tch::{Device, Kind, Tensor};

/// One trained module's parameters.
pub(crate) struct Leaf {
    pub key: ModuleKey,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

impl Leaf {
    /// Its kohya block index (UNet leaves; 0 outside the blocks).
    pub fn block(&self) -> usize {
        block_index(&self.key.path).unwrap_or(0)
    }
}

/// The trained LoRA.
pub(crate) struct Network {
    pub leaves: Vec<Leaf>,
}

impl Network {
    /// Builds kohya-initialised adapters (seeded by `job.seed`) for every
    /// module the job trains and attaches them to `model` at strength 1.
    pub fn attach(job: &JobConfig, model: &SdxlModel, device: Device) -> Result<Self> {
        let n = &job.network;
        let plan = BlockPlan::new(n, &job.train)
            .map_err(|(field, m)| super::data::terr(format!("{field}: {m}")))?;
        let conv = match &plan {
            Some(p) => p.conv_dims.iter().any(|&d| d > 0),
            None => n.conv > 0,
        };
        let scope = TargetScope {
            unet: job.train.train_unet,
            unet_conv: job.train.train_unet && conv,
            te1: job.train.train_text_encoder,
            te2: job.train.train_text_encoder,
        };
        tch::manual_seed(job.job.seed as i64);
        let mut leaves = Vec::new();
        let mut set = LoraSet::new();
        for t in lora_targets(&model.detected.config, scope) {
            let (rank, alpha) = match &plan {
                Some(p) if t.key.component == Component::Unet => {
                    p.rank(&t.key.path, t.uses_conv_rank())
                }
                _ if t.uses_conv_rank() => (n.conv, n.conv_alpha),
                _ => (n.linear, n.linear_alpha),
            };
            if rank == 0 {
                continue; // a block without LoRA (block_dims or a zero rate weight)
            }
            let mut a = LoraAdapter::new(
                t.in_features,
                t.out_features,
                rank,
                Some(alpha),
                t.geometry,
                Kind::Float,
                device,
            )?;
            let down = a.down().unwrap().set_requires_grad(true);
            let up = a.up().unwrap().set_requires_grad(true);
            a.set_weights(down.shallow_clone(), up.shallow_clone())?;
            a.set_dropouts(Dropouts {
                dropout: n.dropout,
                rank_dropout: n.rank_dropout,
                module_dropout: n.module_dropout,
            })?;
            leaves.push(Leaf {
                key: t.key.clone(),
                down,
                up,
                alpha,
            });
            set.insert(t.key, a);
        }
        model.attach_lora(set, 1.0)?;
        Ok(Self { leaves })
    }

    /// The parameters of the leaves `pick` selects, as one optimizer group
    /// (`[down, up]` per leaf) or, with `split` (LoRA+ gives the up
    /// matrices a higher rate), two: the down matrices, then the up ones.
    pub fn group_params(&self, pick: impl Fn(&Leaf) -> bool, split: bool) -> Vec<Vec<Tensor>> {
        let mine = || self.leaves.iter().filter(|l| pick(l));
        if split {
            vec![
                mine().map(|l| l.down.shallow_clone()).collect(),
                mine().map(|l| l.up.shallow_clone()).collect(),
            ]
        } else {
            vec![mine()
                .flat_map(|l| [l.down.shallow_clone(), l.up.shallow_clone()])
                .collect()]
        }
    }

    /// The kohya block indices of the UNet's leaves, ascending, once each.
    pub fn unet_blocks(&self) -> Vec<usize> {
        let set: std::collections::BTreeSet<usize> = (self.leaves.iter())
            .filter(|l| l.key.component == Component::Unet)
            .map(Leaf::block)
            .collect();
        set.into_iter().collect()
    }

    /// Every leaf's `[down, up]` in leaf order (the UNet's leaves first, as
    /// [`lora_targets`] lists them), which is also the order of `params(false)`
    /// followed by `params(true)`.
    pub fn all_params(&self) -> Vec<Tensor> {
        (self.leaves.iter())
            .flat_map(|l| [l.down.shallow_clone(), l.up.shallow_clone()])
            .collect()
    }

    /// A detached copy as a LoRA set (for saving): the trained weights, or
    /// `weights` given in [`Self::all_params`] order (the EMA).
    pub fn to_set(&self, weights: Option<&[Tensor]>) -> Result<LoraSet> {
        let mut set = LoraSet::new();
        for (i, l) in self.leaves.iter().enumerate() {
            let (down, up) = match weights {
                Some(w) => (w[2 * i].detach(), w[2 * i + 1].detach()),
                None => (l.down.detach(), l.up.detach()),
            };
            set.insert(
                l.key.clone(),
                LoraAdapter::from_weights(down, up, Some(l.alpha))?,
            );
        }
        Ok(set)
    }
}
