//! How a run updates its weights: the optimizer over its groups (UNet,
//! one per block with block-wise rates, text encoders, LoRA+'s up
//! matrices), the LR schedule, gradient clipping and the EMA.

use super::blocks::BlockPlan;
use super::ema::{Ema, SavedWeights};
use super::job::JobConfig;
use super::network::{Leaf, Network};
use super::optim::{clear_grads, clip_grad_norm, Optimizer};
use super::plan::Plan;
use super::schedule::LrSchedule;
use crate::error::Result;
use lora_core::Component;
use tch::Tensor;

/// The optimizer over both groups (UNet, text encoders) and the LR schedule.
pub(crate) struct Optimizers {
    pub opt: Box<dyn Optimizer>,
    /// The average of `params` (`train.ema_decay`).
    pub ema: Option<Ema>,
    /// Per optimizer group: text-encoder rate (else the UNet's) and its factor.
    factors: Vec<Factor>,
    /// Each group's rate of the current step (kept: no allocation per step).
    lrs: Vec<f64>,
    params: Vec<Tensor>,
    schedule: LrSchedule,
    lr: f64,
    te_lr: f64,
    warmup: u64,
    total: u64,
    /// Cosines of `cosine_with_restarts`.
    cycles: u32,
    max_grad_norm: f64,
}

impl Optimizers {
    pub(crate) fn new(
        job: &JobConfig,
        plan: &Plan,
        network: &Network,
        notes: &mut Vec<String>,
    ) -> Result<Self> {
        let train = &job.train;
        if let Some(note) = &plan.schedule_note {
            tracing::warn!("{note}");
        }
        let args = &plan.optimizer;
        if let Some(note) = args.note() {
            tracing::warn!("{note}");
            notes.push(note);
        }
        for note in BlockPlan::notes(train) {
            tracing::warn!("{note}");
            notes.push(note);
        }
        let (groups, factors) = param_groups(job, network)?;
        Ok(Self {
            opt: args.build(plan.weight_decay, groups),
            ema: train
                .ema_decay
                .map(|d| Ema::new(&network.all_params(), d, train.ema_power)),
            lrs: vec![0.0; factors.len()],
            factors,
            params: network.all_params(),
            schedule: plan.schedule,
            lr: train.lr,
            te_lr: train.text_encoder_lr.unwrap_or(train.lr),
            warmup: train.warmup_steps,
            total: train.steps,
            cycles: train.lr_scheduler_num_cycles,
            max_grad_norm: train.max_grad_norm,
        })
    }

    /// The trained tensors and their average when EMA is on (the files
    /// hold the average), for [`super::RunView::with_saved_weights`].
    pub(crate) fn saved_weights(&self) -> Option<SavedWeights> {
        (self.ema.as_ref()).map(|ema| SavedWeights::new(&self.params, ema))
    }

    /// Clips the gradients, updates both parts at the scheduled rates of
    /// optimizer step `step` (0-based) and clears the gradients; returns
    /// the UNet's rate and the gradient norm before clipping (when clipping).
    pub fn step(&mut self, step: u64) -> (f64, Option<Tensor>) {
        let norm =
            (self.max_grad_norm > 0.0).then(|| clip_grad_norm(&self.params, self.max_grad_norm));
        let (total, warmup, cycles) = (self.total, self.warmup, self.cycles);
        let lr = self.schedule.lr(self.lr, step, total, warmup, cycles);
        let lr_te = self.schedule.lr(self.te_lr, step, total, warmup, cycles);
        for (slot, &(te, f)) in self.lrs.iter_mut().zip(&self.factors) {
            *slot = if te { lr_te } else { lr } * f;
        }
        self.opt.step(&self.lrs);
        if let Some(ema) = &mut self.ema {
            ema.update(&self.params);
        }
        clear_grads(&self.params);
        (lr, norm)
    }
}

/// An optimizer group: its name and parameters.
type Group = (String, Vec<Tensor>);
/// Per group: whether it takes the text-encoder rate, and its factor.
type Factor = (bool, f64);

/// The optimizer groups of a run and, per group, whether it takes the
/// text-encoder rate and its factor on that rate: the UNet (one group per
/// block with block-wise rates, each weighted) and the text encoders;
/// LoRA+ splits each into down and up matrices (`…_up`, rate × ratio).
fn param_groups(job: &JobConfig, network: &Network) -> Result<(Vec<Group>, Vec<Factor>)> {
    let train = &job.train;
    let plan = BlockPlan::new(&job.network, train)
        .map_err(|(f, m)| crate::SdxlError::train(format!("{f}: {m}")))?;
    let ratio = train.loraplus_lr_ratio;
    let (mut groups, mut factors) = (Vec::new(), Vec::new());
    let mut add = |name: String, te: bool, f: f64, params: Vec<Vec<Tensor>>| {
        let mut parts = params.into_iter();
        groups.push((name.clone(), parts.next().unwrap_or_default()));
        factors.push((te, f));
        if let (Some(up), Some(r)) = (parts.next(), ratio) {
            groups.push((format!("{name}_up"), up));
            factors.push((te, f * r));
        }
    };
    let unet = |l: &Leaf| l.key.component == Component::Unet;
    match plan.as_ref().and_then(|p| p.lr_weights) {
        None => add(
            "unet".into(),
            false,
            1.0,
            network.group_params(unet, ratio.is_some()),
        ),
        Some(w) => {
            for b in network.unet_blocks() {
                let pick = |l: &Leaf| unet(l) && l.block() == b;
                add(
                    format!("unet_block{b}"),
                    false,
                    w[b],
                    network.group_params(pick, ratio.is_some()),
                );
            }
        }
    }
    add(
        "te".into(),
        true,
        1.0,
        network.group_params(|l| !unet(l), ratio.is_some()),
    );
    Ok((groups, factors))
}
