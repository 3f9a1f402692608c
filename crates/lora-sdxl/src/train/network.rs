//! The LoRA under training: fp32 leaves per target module (kohya's LoRA /
//! LoCon targets) — a `down`/`up` pair (`network.type = "lora"`), or
//! LyCORIS' LoHa / LoKr factors — attached to the model's slots.

use super::blocks::{block_index, BlockPlan};
use super::job::JobConfig;
use super::optim::clear_grads;
use super::plan::{NetworkKind, Plan};
use super::shard::Shard;
use crate::error::Result;
use crate::model::sdxl::SdxlModel;
use crate::model::targets::{lora_targets, Target, TargetScope};
use lora_core::lycoris::LycoAdapter;
use lora_core::{
    BatchRows, Component, Dropouts, Geometry, LoraAdapter, LoraSet, ModuleKey, ModuleSwitch,
};
use lora_data::loader::derived_rng;
use rand::Rng;
use tch::{Device, Kind, Tensor};

/// One trained module's parameters.
pub(crate) struct Leaf {
    pub key: ModuleKey,
    /// The tensors under their file key suffixes (`lora_down.weight`,
    /// `lora_up.weight`, or `hada_w1_a`, `lokr_w1`, …), in file order.
    pub params: Vec<(&'static str, Tensor)>,
    pub alpha: f64,
    /// Module dropout's switch of this module's adapter.
    pub switch: ModuleSwitch,
    /// The layer (to rebuild a LyCORIS adapter from its tensors).
    in_features: i64,
    geometry: Geometry,
}

impl Leaf {
    /// The name of tensor `suffix` in `state.safetensors` (`down` / `up`
    /// for a LoRA pair, as states have always named them).
    pub fn state_name(&self, suffix: &str) -> String {
        let short = match suffix {
            "lora_down.weight" => "down",
            "lora_up.weight" => "up",
            other => other,
        };
        format!("{}.{short}", self.key.kohya_name())
    }

    /// A detached adapter of this module with `tensors` (its own, or the
    /// EMA's) in [`Self::params`] order, rebuilt as a file's module is.
    fn adapter(&self, tensors: Vec<Tensor>) -> Result<LoraAdapter> {
        let named: Vec<(&str, Tensor)> = self.params.iter().map(|(n, _)| *n).zip(tensors).collect();
        let get = |k: &str| {
            named
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, t)| t.shallow_clone())
        };
        let mut a = LoraAdapter::from_named(&get, Some(self.alpha))?.ok_or_else(|| {
            lora_core::LoraError::Invalid(format!("`{}` has no tensors", self.key.kohya_name()))
        })?;
        a.fit_layer(self.in_features, self.geometry)?;
        Ok(a)
    }

    /// Its kohya block index (UNet leaves; 0 outside the blocks).
    pub fn block(&self) -> usize {
        block_index(&self.key.path).unwrap_or(0)
    }
}

/// The trained LoRA.
pub(crate) struct Network {
    pub leaves: Vec<Leaf>,
    /// This process's rows of each global batch, shared by every adapter
    /// (their neuron and rank dropout masks are drawn for the global batch).
    pub rows: BatchRows,
    /// `network.module_dropout` and the seed of its draws.
    module_dropout: Dropouts,
    seed: u64,
    /// Per leaf: whether module dropout kept it in a micro-step of the
    /// optimizer step under way.
    live: Vec<bool>,
}

impl Network {
    /// Builds kohya-initialised adapters (seeded by `job.seed`) for every
    /// module the job trains and attaches them to `model` at strength 1.
    pub fn attach(job: &JobConfig, kind: &Plan, model: &SdxlModel, device: Device) -> Result<Self> {
        let network = &job.network;
        let plan = BlockPlan::new(network, &job.train)
            .map_err(|(field, m)| crate::SdxlError::train(format!("{field}: {m}")))?;
        let conv = match &plan {
            Some(p) => p.conv_dims.iter().any(|&d| d > 0),
            None => network.conv > 0,
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
        let rows = BatchRows::default();
        for t in lora_targets(&model.detected.config, scope) {
            let (rank, alpha) = match &plan {
                Some(p) if t.key.component == Component::Unet => {
                    p.rank(&t.key.path, t.uses_conv_rank())
                }
                _ if t.uses_conv_rank() => (network.conv, network.conv_alpha),
                _ => (network.linear, network.linear_alpha),
            };
            if rank == 0 {
                continue; // a block without LoRA (block_dims or a zero rate weight)
            }
            let mut a = new_adapter(kind, &t, rank, alpha, device)?;
            if kind.dora {
                let slot = model.slots.get(&t.key).ok_or_else(|| {
                    crate::error::SdxlError::Lora(lora_core::LoraError::Invalid(format!(
                        "`{}` has no layer to decompose",
                        t.key.kohya_name()
                    )))
                })?;
                a.enable_dora(&slot.weight.to_device(device))?;
            }
            let params: Vec<Tensor> = (a.parameters().iter())
                .map(|p| p.set_requires_grad(true))
                .collect();
            a.set_parameters(params.iter().map(Tensor::shallow_clone).collect())?;
            a.set_dropouts(Dropouts {
                dropout: network.dropout,
                rank_dropout: network.rank_dropout,
                module_dropout: network.module_dropout,
            })?;
            a.set_batch_rows(rows.clone());
            let names = a.named_tensors().into_iter().map(|(name, _)| name);
            leaves.push(Leaf {
                key: t.key.clone(),
                params: names.zip(params).collect(),
                alpha: a.alpha(),
                switch: a.module_switch(),
                in_features: t.in_features,
                geometry: t.geometry,
            });
            set.insert(t.key, a);
        }
        model.attach_lora(set, 1.0)?;
        Ok(Self {
            live: vec![false; leaves.len()],
            leaves,
            rows,
            module_dropout: Dropouts {
                module_dropout: network.module_dropout,
                ..Default::default()
            },
            seed: job.job.seed,
        })
    }

    /// Before micro-step `micro_id`, whose global batch has `n` samples:
    /// this process's rows of it (for the dropout masks), and module
    /// dropout's choice per leaf — a host draw from the run's seed and the
    /// micro-step, so every rank draws the same, a resume draws again what
    /// the saved run drew, and no device value is read.
    pub fn before_micro_step(&mut self, shard: Shard, n: usize, micro_id: u64) {
        let (lo, hi) = shard.range(n);
        self.rows.set(lo, hi - lo, n);
        if self.module_dropout.module_dropout == 0.0 {
            return;
        }
        let mut rng = derived_rng(self.seed, &[5, micro_id]);
        for (leaf, live) in self.leaves.iter().zip(&mut self.live) {
            let dropped = self.module_dropout.drops_module(rng.gen());
            leaf.switch.set_dropped(dropped);
            *live |= !dropped;
        }
    }

    /// Before the optimizer step: the leaves module dropout left out of
    /// every micro-step of it lose their gradients (a data-parallel
    /// average gives them zeros), so the optimizer skips them as torch's
    /// skip a parameter whose gradient is `None` (issue 28, item 1).
    pub fn freeze_left_out(&mut self) {
        if self.module_dropout.module_dropout == 0.0 {
            return;
        }
        for (leaf, live) in self.leaves.iter().zip(&mut self.live) {
            if !*live {
                let params: Vec<Tensor> =
                    leaf.params.iter().map(|(_, t)| t.shallow_clone()).collect();
                clear_grads(&params);
            }
            *live = false;
        }
    }

    /// The LoKr modules whose two Kronecker factors are both full matrices
    /// (`lokr_w1` and `lokr_w2`, neither decomposed): LyCORIS trains them
    /// at scale 1 and saves alpha = rank, whatever alpha the job set.
    pub fn full_kron_modules(&self) -> Vec<&ModuleKey> {
        let full = |l: &Leaf| {
            let has = |n: &str| l.params.iter().any(|(s, _)| *s == n);
            has("lokr_w1") && has("lokr_w2")
        };
        self.leaves
            .iter()
            .filter(|l| full(l))
            .map(|l| &l.key)
            .collect()
    }

    /// What the job should know about its network, for the run's notes:
    /// LoKr modules that ignore the alpha (issue 28: silently 16× stronger
    /// than the rest with LyCORIS' `linear_alpha = 1`).
    pub fn notes(&self, job: &JobConfig) -> Vec<String> {
        let full = self.full_kron_modules();
        let Some(first) = full.first() else {
            return Vec::new();
        };
        vec![format!(
            "LoKr: {} of {} modules (e.g. {}) have both Kronecker factors full, so they train at scale 1 and their files save alpha = rank, whatever network.linear_alpha = {} / conv_alpha = {} say (LyCORIS does the same and warns); a rank below half of the second factor's side decomposes it: lower network.linear / conv or change network.factor",
            full.len(),
            self.leaves.len(),
            first.kohya_name(),
            lora_core::metadata::py_float(job.network.linear_alpha),
            lora_core::metadata::py_float(job.network.conv_alpha),
        )]
    }

    /// The parameters of the leaves `pick` selects, as one optimizer group
    /// (every tensor of each leaf) or, with `split` (LoRA+ gives the up
    /// matrices a higher rate), two: the down matrices, then the up ones.
    pub fn group_params(&self, pick: impl Fn(&Leaf) -> bool, split: bool) -> Vec<Vec<Tensor>> {
        let mine = || self.leaves.iter().filter(|l| pick(l));
        let nth =
            |i: usize| mine().flat_map(move |l| l.params.get(i).map(|(_, t)| t.shallow_clone()));
        if split {
            vec![nth(0).collect(), nth(1).collect()]
        } else {
            vec![mine()
                .flat_map(|l| l.params.iter().map(|(_, t)| t.shallow_clone()))
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

    /// Every leaf's tensors in leaf order (the UNet's leaves first, as
    /// [`lora_targets`] lists them), which is also the order of the UNet's
    /// group followed by the text encoders'.
    pub fn all_params(&self) -> Vec<Tensor> {
        (self.leaves.iter())
            .flat_map(|l| l.params.iter().map(|(_, t)| t.shallow_clone()))
            .collect()
    }

    /// A detached copy as a LoRA set (for saving): the trained weights, or
    /// `weights` given in [`Self::all_params`] order (the EMA).
    pub fn to_set(&self, weights: Option<&[Tensor]>) -> Result<LoraSet> {
        let mut set = LoraSet::new();
        let mut at = 0;
        for l in &self.leaves {
            let n = l.params.len();
            let tensors: Vec<Tensor> = match weights {
                Some(w) => w[at..at + n].iter().map(Tensor::detach).collect(),
                None => l.params.iter().map(|(_, t)| t.detach()).collect(),
            };
            at += n;
            set.insert(l.key.clone(), l.adapter(tensors)?);
        }
        Ok(set)
    }
}

/// A fresh adapter of the plan's network type for target `t`: a kohya
/// pair, or LyCORIS' LoHa / LoKr (`network.factor`, `network.decompose_both`).
fn new_adapter(
    plan: &Plan,
    t: &Target,
    rank: i64,
    alpha: f64,
    device: Device,
) -> Result<LoraAdapter> {
    let opts = (Kind::Float, device);
    let (i, o) = (t.in_features, t.out_features);
    Ok(match plan.network {
        NetworkKind::Loha => LoraAdapter::from_lyco(LycoAdapter::new_loha(
            i,
            o,
            rank,
            Some(alpha),
            t.geometry,
            opts,
        )?),
        NetworkKind::Lokr => LoraAdapter::from_lyco(LycoAdapter::new_lokr(
            i,
            o,
            rank,
            Some(alpha),
            plan.lokr,
            t.geometry,
            opts,
        )?),
        NetworkKind::Lora | NetworkKind::Locon => {
            LoraAdapter::new(i, o, rank, Some(alpha), t.geometry, Kind::Float, device)?
        }
    })
}
