//! The training loop, top to bottom. It reads batches, runs micro-steps,
//! updates the LoRA, measures the validation loss and saves checkpoints and
//! state; everything else (terminal, `loss.csv`, charts, rotation, samples)
//! happens in observers of the [`Event`]s it emits.

use super::checkpoint::{save_lora, training_metadata};
use super::events::{dispatch, Event, Observers, RunView};
use super::run::{Run, TrainOptions, TrainReport};
use super::shard::DistRun;
use super::state::save_state;
use super::step::StepLoss;
use crate::error::Result;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The training loss (and the output-preservation term) summed on the
/// device between two reads, so that a step needs no host sync.
struct LossMeter {
    sum: Tensor,
    preservation: Option<Tensor>,
    n: u64,
}

impl LossMeter {
    fn new(device: tch::Device) -> Self {
        Self {
            sum: Tensor::zeros([], (Kind::Float, device)),
            preservation: None,
            n: 0,
        }
    }
    fn add(&mut self, step: &StepLoss) {
        self.sum += step.loss.detach();
        if let Some(p) = &step.preservation {
            match &mut self.preservation {
                Some(sum) => *sum += p,
                None => self.preservation = Some(p.to_kind(Kind::Float)),
            }
        }
        self.n += 1;
    }
    /// Folds a gradient norm into the sum at weight 0: a NaN or Inf norm
    /// makes the mean non-finite (0·NaN = 0·Inf = NaN), a finite one changes
    /// nothing, and no host sync is needed to notice it at the next read.
    fn watch(&mut self, norm: Option<Tensor>) {
        if let Some(n) = norm {
            self.sum += n.detach().to_kind(Kind::Float) * 0.0;
        }
    }
    /// The means of the loss and of the preservation term since the last
    /// read (one host sync; in a data-parallel run the means over the ranks,
    /// which every rank reads at the same steps), and a reset.
    fn take(&mut self, dist: Option<&DistRun>) -> Result<(f64, Option<f64>)> {
        // one read for both
        let both = match self.preservation.take() {
            Some(p) => Tensor::stack(&[&self.sum, &p], 0),
            None => self.sum.unsqueeze(0),
        };
        if let Some(d) = dist {
            d.mean(&both)?;
        }
        let sums: Vec<f64> = (both.to_kind(Kind::Double).to_device(tch::Device::Cpu))
            .iter::<f64>()
            .map_err(|e| crate::SdxlError::train(e.to_string()))?
            .collect();
        let n = self.n.max(1) as f64;
        self.sum = self.sum.zeros_like();
        self.n = 0;
        Ok((sums[0] / n, sums.get(1).map(|p| p / n)))
    }
}

/// The error of a run whose loss or gradients became NaN or Inf.
fn diverged(step: u64, loss: f64) -> crate::SdxlError {
    crate::SdxlError::train(format!(
        "training diverged: the loss (or a gradient norm) is {loss} by step {step}. Nothing was saved for this step; the last checkpoint and state.safetensors are kept. Lower train.lr, or use train.dtype = \"bf16\" or \"fp32\", then resume or restart"
    ))
}

impl Run {
    /// Trains until `train.steps`, or until `opts.stop` is set (then the
    /// step is finished, checkpoint and state are saved, and the report says
    /// `interrupted`). `observers` see every event, in order.
    ///
    /// Long on purpose: the whole loop in one place, top to bottom (this
    /// file's point); everything around it is an observer of its events.
    pub fn fit(
        mut self,
        observers: &mut Observers<'_>,
        opts: &TrainOptions,
    ) -> Result<TrainReport> {
        let env = &self.env;
        let (job, train) = (&env.job, &env.job.train);
        let view = RunView::new(
            job,
            &env.plan,
            &env.job_path,
            &env.run_dir,
            &env.model,
            &env.tok,
            self.optim.saved_weights(),
        );
        let mut report = TrainReport {
            step: self.pos.step,
            interrupted: false,
            run_dir: env.run_dir.clone(),
            last_lora: None,
            val_losses: Vec::new(),
            reg_val_losses: Vec::new(),
            images: env.data.images.len(),
            decode: Default::default(),
        };
        dispatch(observers, &view, self.started_event())?;
        let main = env.shard.is_main();
        if !self.resumed && main {
            let (v, reg) = self.validate()?;
            report.record_validation(0, v, reg);
            let seconds = self.started.elapsed().as_secs_f64();
            dispatch(
                observers,
                &view,
                Event::Validation {
                    step: 0,
                    loss: v,
                    reg_loss: reg,
                    seconds,
                },
            )?;
        }

        let accum = train.gradient_accumulation as u64;
        let first_step = self.pos.step;
        let mut meter = LossMeter::new(env.model.unet_device());
        let mut micro = 0u64;
        let mut train_seconds = 0.0;
        let mut lap = Instant::now();
        env.model.slots.set_training(true);
        'epochs: loop {
            let batches = env.data.epoch(self.pos.epoch, job.job.seed);
            while self.pos.batch < batches.len() {
                let (planned, samples) = &batches[self.pos.batch];
                self.pos.batch += 1;
                // decode the next batch's images while this one trains
                if let Some(next) = batches.get(self.pos.batch) {
                    env.prefetch(next);
                }
                let micro_id = self.pos.step * accum + micro;
                self.network
                    .before_micro_step(env.shard, samples.len(), micro_id);
                // an empty slice (more ranks than items) adds no gradient
                if let Some(loss) = env.micro_step(planned, samples, micro_id)? {
                    (&loss.loss / accum as f64).backward();
                    meter.add(&loss);
                }
                micro += 1;
                if micro < accum {
                    continue;
                }
                micro = 0;
                if let Some(d) = &self.dist {
                    d.average_gradients()?;
                }
                self.network.freeze_left_out();
                let (lr, grad_norm) = self.optim.step(self.pos.step);
                meter.watch(grad_norm);
                self.pos.step += 1;
                if self.pos.step == first_step + 1 {
                    // a diagnostic run counts the host syncs of the steps
                    // after this process's first (see crate::device)
                    if let Some(mode) = crate::device::sync_debug_from_env() {
                        crate::device::set_sync_debug(mode);
                    }
                }
                train_seconds += lap.elapsed().as_secs_f64();

                // ---- after the update: report, validate, save
                let step = self.pos.step;
                report.step = step;
                let mut stopping =
                    opts.stop.load(Ordering::SeqCst) || opts.stop_at_step == Some(step);
                if let Some(d) = &mut self.dist {
                    stopping = d.any_stop(stopping)?;
                }
                let last = step >= train.steps;
                let save = step.is_multiple_of(job.save.save_every) || last || stopping;
                let (loss, preservation) = if step.is_multiple_of(10) || save {
                    let (l, p) = meter.take(self.dist.as_ref())?;
                    (Some(l), p)
                } else {
                    (None, None)
                };
                // a non-finite preservation term is in the loss too
                if let Some(l) = loss.filter(|l| !l.is_finite()) {
                    // before any save: the last checkpoint and state stay good
                    return Err(diverged(step, l));
                }
                // validation and saves read to the host by design: a
                // sync-debug run (crate::device) watches the steps alone
                let val = if main && (step.is_multiple_of(self.validation.every) || last) {
                    let v = crate::device::unwatched(|| {
                        view.with_saved_weights(|| env.model.slots.in_eval(|| self.validate()))
                    });
                    Some(v?)
                } else {
                    None
                };
                let saved = if save && main {
                    Some(crate::device::unwatched(|| self.save(last))?)
                } else {
                    None
                };
                if let (true, Some(d)) = (save, &self.dist) {
                    // no rank runs ahead of a save (or exits before it)
                    d.pg.barrier()?;
                }
                let seconds = self.started.elapsed().as_secs_f64();
                dispatch(
                    observers,
                    &view,
                    Event::Step {
                        step,
                        loss,
                        preservation,
                        lr,
                        seconds,
                        train_seconds,
                    },
                )?;
                if let Some((v, reg)) = val {
                    report.record_validation(step, v, reg);
                    dispatch(
                        observers,
                        &view,
                        Event::Validation {
                            step,
                            loss: v,
                            reg_loss: reg,
                            seconds,
                        },
                    )?;
                }
                if let Some((path, state)) = saved {
                    report.last_lora = Some(path.clone());
                    dispatch(
                        observers,
                        &view,
                        Event::Checkpoint {
                            step,
                            path,
                            state,
                            last,
                        },
                    )?;
                }
                if last {
                    dispatch(observers, &view, Event::Finished { step })?;
                    break 'epochs;
                }
                if stopping {
                    report.interrupted = true;
                    dispatch(observers, &view, Event::Stopped { step })?;
                    break 'epochs;
                }
                lap = Instant::now();
            }
            self.pos.epoch += 1;
            self.pos.batch = 0;
        }
        env.model.slots.set_training(false);
        env.model.detach_loras();
        report.decode = env.inputs.stats.get();
        Ok(report)
    }

    /// Writes the LoRA of the current step (`last`: the final file) and the
    /// resumable state; returns both paths.
    fn save(&self, last: bool) -> Result<(PathBuf, PathBuf)> {
        let env = &self.env;
        let md = training_metadata(
            (&env.job, &env.plan),
            &env.data,
            (
                env.model.detected.prediction,
                env.model.detected.zero_terminal_snr,
            ),
            self.pos.step,
            (self.pos.epoch, self.pos.batch > 0),
            self.started_unix,
            last,
        );
        let path = save_lora(
            (&env.job, &env.plan),
            &env.run_dir,
            &self.network,
            self.optim.ema.as_ref(),
            self.pos.step,
            last,
            &md,
        )?;
        let state = env.run_dir.join("state.safetensors");
        save_state(
            &state,
            &self.network,
            self.optim.opt.as_ref(),
            self.optim.ema.as_ref(),
            &self.hash,
            env.job.job.id.as_deref(),
            self.pos,
        )?;
        Ok((path, state))
    }

    /// The validation loss of the train images and, with regularisation
    /// datasets, of the reg images.
    fn validate(&self) -> Result<(f64, Option<f64>)> {
        let (env, v) = (&self.env, &self.validation);
        let train = env.validation_loss(&v.items, v.seed)?;
        let reg = if v.reg_items.is_empty() {
            None
        } else {
            Some(env.validation_loss(&v.reg_items, v.seed)?)
        };
        Ok((train, reg))
    }

    fn started_event(&self) -> Event {
        let env = &self.env;
        Event::Started {
            step: self.pos.step,
            total_steps: env.job.train.steps,
            resumed: self.resumed,
            datasets: env.data.summaries.clone(),
            modules: self.network.leaves.len(),
            images: env.data.images.len(),
            samples_per_epoch: env.data.samples_per_epoch(),
            device: format!("{:?}", env.model.unet_device()),
            notes: self.notes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::job::JobConfig;
    use crate::train::run::TrainOptions;

    /// Issue 28: with EMA on, the validation loss was measured on the raw
    /// weights while the file held the average. Now the loss logged at a
    /// save is the saved file's: the file loaded into a fresh run (EMA off)
    /// and validated there gives the same number, bit for bit (same
    /// weights, images, noise and operations in one process).
    #[test]
    fn with_ema_the_logged_validation_loss_is_the_saved_files() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.safetensors");
        let config = crate::SdxlConfig::tiny();
        crate::synthetic::write_random_checkpoint(&model, &config, 1, tch::Kind::Float).unwrap();
        let data = dir.path().join("data");
        lora_data::synthetic::write_character_dataset(&data, 2, 256, 256, "trig", 1).unwrap();
        let path = dir.path().join("job.toml");
        let job = |name: &str, ema: Option<f64>| {
            let text = JobConfig::template(model.to_str(), data.to_str(), Some("trig"), None);
            let mut c = JobConfig::parse(&path, &text).unwrap();
            c.job.name = name.into();
            c.job.device = Some("cpu".into());
            c.job.output_dir = dir.path().join("out");
            (c.network.linear, c.network.linear_alpha, c.network.conv) = (4, 4.0, 0);
            (
                c.train.steps,
                c.train.batch_size,
                c.train.gradient_accumulation,
            ) = (3, 1, 1);
            (c.train.lr, c.train.dtype, c.save.dtype) = (1e-2, "fp32".into(), "fp32".into());
            c.train.ema_decay = ema;
            c.save.save_every = 3;
            c.validation.images = Some(1);
            c.datasets[0].resolution = vec![256];
            c
        };
        let quiet = TrainOptions {
            quiet: true,
            ..Default::default()
        };
        let averaged = crate::train::train(&job("ema", Some(0.9)), &path, &quiet).unwrap();
        let (step, logged) = *averaged.val_losses.last().unwrap();
        assert_eq!(step, 3);
        let file: std::collections::HashMap<String, Tensor> =
            lora_core::io::read_tensors(averaged.last_lora.unwrap())
                .unwrap()
                .tensors
                .into_iter()
                .collect();
        let run = Run::prepare(&job("afresh", None), &path, &quiet).unwrap();
        tch::no_grad(|| {
            for leaf in &run.network.leaves {
                for (suffix, t) in &leaf.params {
                    let key = format!("{}.{suffix}", leaf.key.kohya_name());
                    t.shallow_clone().copy_(&file[&key]);
                }
            }
        });
        let (afresh, _) = run.env.model.slots.in_eval(|| run.validate()).unwrap();
        assert_eq!(logged, afresh, "the logged loss is not the saved file's");
    }
}
