//! The standard observers of a run's [`Event`]s. Each does one
//! thing, so a library user can replace or add any of them
//! ([`super::train_with`]).
//!
//! | observer | what it does |
//! |---|---|
//! | [`console::Console`] | progress bar on a terminal, plain log lines otherwise |
//! | [`loss_csv::LossCsv`] | `loss.csv`: `step,loss,lr,val_loss,seconds` (`,val_reg_loss` with regularisation images) |
//! | [`loss_chart::LossChart`] | `loss.png` from `loss.csv` at every checkpoint |
//! | [`event_log::EventLog`] | `events.jsonl`: every event as a JSON line, for programs following the run |
//! | [`rotation::Rotation`] | keeps the newest `max_step_saves_to_keep` step files |
//! | [`samples::Samples`] | in-training samples and `samples/grid.png` |

pub mod console;
pub mod event_log;
pub mod loss_chart;
pub mod loss_csv;
pub mod rotation;
pub mod samples;

use super::events::{Event, Observers};
use super::job::JobConfig;
use std::path::Path;

/// The standard observers in order: console (unless `quiet`), `loss.csv`,
/// `loss.png` (after the CSV is written), `events.jsonl`, rotation, samples
/// (unless `sample.disable`).
pub fn standard<'o>(job: &JobConfig, run_dir: &Path, quiet: bool) -> Observers<'o> {
    let mut o: Observers<'o> = Vec::new();
    if !quiet {
        o.push(Box::new(console::Console::new()));
    }
    o.push(Box::new(loss_csv::LossCsv::new(run_dir.join("loss.csv"))));
    o.push(Box::new(loss_chart::LossChart::new(
        run_dir.join("loss.csv"),
        run_dir.join("loss.png"),
        format!("{}: loss by step", job.job.name),
    )));
    o.push(Box::new(event_log::EventLog::new(
        run_dir.join("events.jsonl"),
    )));
    o.push(Box::new(rotation::Rotation::new(
        job.save.max_step_saves_to_keep as usize,
    )));
    if !job.sample.disable {
        o.push(Box::new(samples::Samples));
    }
    o
}

/// One line of the training log: a step's training loss and, when measured
/// at the same step, its validation loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRecord {
    /// Optimizer steps done.
    pub step: u64,
    /// Mean training loss since the previous record.
    pub loss: Option<f64>,
    /// Mean output-preservation term over the same steps.
    pub preservation: Option<f64>,
    /// Learning rate.
    pub lr: Option<f64>,
    /// Validation loss.
    pub val: Option<f64>,
    /// Validation loss of the regularisation images.
    pub val_reg: Option<f64>,
    /// Wall-clock seconds since the start.
    pub seconds: f64,
    /// Seconds of training steps alone since the start.
    pub train_seconds: f64,
}

/// Joins [`Event::Step`] (with a loss) and the [`Event::Validation`] of the
/// same step into one [`LogRecord`]; a validation without a logged step (step
/// 0) is a record of its own.
#[derive(Debug, Default)]
pub struct LogMerger {
    pending: Option<LogRecord>,
    /// Training seconds of the last step (for a validation-only record).
    last_train_seconds: f64,
}

impl LogMerger {
    /// Feeds an event; returns the records completed by it.
    pub fn push(&mut self, event: &Event) -> Vec<LogRecord> {
        let mut done: Vec<LogRecord> = Vec::new();
        match *event {
            Event::Step {
                step,
                loss,
                preservation,
                lr,
                seconds,
                train_seconds,
            } => {
                done.extend(self.pending.take());
                self.last_train_seconds = train_seconds;
                if loss.is_some() {
                    self.pending = Some(LogRecord {
                        step,
                        loss,
                        preservation,
                        lr: Some(lr),
                        val: None,
                        val_reg: None,
                        seconds,
                        train_seconds,
                    });
                }
            }
            Event::Validation {
                step,
                loss,
                reg_loss,
                seconds,
            } => match self.pending.take() {
                Some(mut r) if r.step == step => {
                    r.val = Some(loss);
                    r.val_reg = reg_loss;
                    done.push(r);
                }
                other => {
                    done.extend(other);
                    let train_seconds = self.last_train_seconds;
                    done.push(LogRecord {
                        step,
                        loss: None,
                        preservation: None,
                        lr: None,
                        val: Some(loss),
                        val_reg: reg_loss,
                        seconds,
                        train_seconds,
                    });
                }
            },
            // samples rendered at a step come between its Step and its
            // Validation: they do not end the step's record
            Event::Samples { .. } => {}
            _ => done.extend(self.pending.take()),
        }
        done
    }
}
