//! The event stream of a training run. The loop ([`super::run`]) knows
//! nothing of terminals, CSV files, charts or sample grids: it emits
//! [`Event`]s, and [`Observer`]s — the progress bar and log lines, `loss.csv`,
//! `loss.png`, the checkpoint rotation, the in-training samples, or a library
//! user's own (a GUI, a web page, a test) — act on them.
//!
//! ```no_run
//! use lora_sdxl::train::{train_with, Event, Observer, RunView, TrainOptions};
//! use lora_sdxl::JobConfig;
//! use std::path::Path;
//!
//! struct PrintLosses;
//! impl Observer for PrintLosses {
//!     fn on_event(&mut self, event: &Event, _run: &RunView<'_>) -> lora_sdxl::Result<()> {
//!         if let Event::Validation { step, loss, .. } = event {
//!             println!("step {step}: validation loss {loss:.4}");
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let path = Path::new("job.toml");
//! let job = JobConfig::load(path)?;
//! let report = train_with(&job, path, &TrainOptions::default(), vec![Box::new(PrintLosses)])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::data::DatasetSummary;
use super::job::JobConfig;
use crate::error::Result;
use crate::model::sdxl::SdxlModel;
use crate::model::tokenizer::ClipTokenizer;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// Something that happened in a run, in the order it happened.
///
/// Per optimizer step the loop emits [`Event::Step`], then
/// [`Event::Validation`] when the validation loss was measured at that step,
/// then [`Event::Checkpoint`] when files were saved (they are on disk by
/// then). [`Event::Samples`] is emitted by the samples observer after it
/// rendered a round.
///
/// The same type reads `events.jsonl` back (`lorakit ui` does): one schema
/// for the writer and its readers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The run is set up and about to train (from `step`; `resumed` when
    /// continued from a saved state).
    Started {
        /// Optimizer steps already done.
        step: u64,
        /// `train.steps`.
        total_steps: u64,
        /// Continued from `state.safetensors`.
        resumed: bool,
        /// Per `[[datasets]]` folder: usable images of those found.
        datasets: Vec<DatasetSummary>,
        /// LoRA modules trained.
        modules: usize,
        /// Images trained on.
        images: usize,
        /// Images × repeats × resolutions.
        samples_per_epoch: u64,
        /// The device, e.g. `Cpu` or `Cuda(0)`.
        device: String,
        /// Settings chosen for this run and why (prediction type and noise
        /// schedule and their source, gradient checkpointing, …).
        notes: Vec<String>,
    },
    /// An optimizer step is done.
    Step {
        /// Optimizer steps done.
        step: u64,
        /// Mean training loss since the previous reported loss; read from the
        /// device only every 10 steps, at saves and at the end (no host sync
        /// on the other steps), `None` on those. The whole objective: with
        /// output preservation it includes `multiplier × preservation`.
        loss: Option<f64>,
        /// Mean output-preservation term since the previous reported loss
        /// (`mse` of the LoRA's and the base's predictions for the preserved
        /// captions, before its multiplier; see
        /// [`crate::train::preservation`]), read when `loss` is; `None`
        /// without preservation and on the steps without a loss.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        preservation: Option<f64>,
        /// UNet learning rate used for this step.
        lr: f64,
        /// Wall-clock seconds since the run started (validation, saves and
        /// samples included), as in `loss.csv`.
        seconds: f64,
        /// Seconds spent in training steps alone since the run started
        /// (validation, saving and sampling excluded): the rate of training.
        train_seconds: f64,
    },
    /// The fixed-seed validation loss at `step`.
    Validation {
        /// Optimizer steps done (0: before training).
        step: u64,
        /// Mean loss over the validation images and fixed timesteps.
        loss: f64,
        /// The same over regularisation images (jobs with `is_reg` datasets).
        reg_loss: Option<f64>,
        /// Wall-clock seconds since the run started, when it was measured.
        seconds: f64,
    },
    /// A LoRA file and the resumable state were written.
    Checkpoint {
        /// Optimizer steps done.
        step: u64,
        /// The LoRA file (`<name>_<step>.safetensors`, or `<name>.safetensors`
        /// when `last`).
        path: PathBuf,
        /// `state.safetensors`.
        state: PathBuf,
        /// The final file of a completed run.
        last: bool,
    },
    /// A round of in-training samples was rendered into `dir`.
    Samples {
        /// Optimizer steps done.
        step: u64,
        /// `<run>/samples`.
        dir: PathBuf,
    },
    /// Stopped before `train.steps` (stop flag / Ctrl-C); checkpoint and
    /// state of `step` are saved.
    Stopped {
        /// Optimizer steps done.
        step: u64,
    },
    /// `train.steps` reached.
    Finished {
        /// Optimizer steps done.
        step: u64,
    },
}

impl Event {
    /// Its name in `events.jsonl` (the `event` field).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Started { .. } => "started",
            Event::Step { .. } => "step",
            Event::Validation { .. } => "validation",
            Event::Checkpoint { .. } => "checkpoint",
            Event::Samples { .. } => "samples",
            Event::Stopped { .. } => "stopped",
            Event::Finished { .. } => "finished",
        }
    }
}

/// What observers may read of a run: the job, its folder, and the model
/// with the LoRA under training attached (for sampling with it).
pub struct RunView<'a> {
    /// The job.
    pub job: &'a JobConfig,
    /// Its named choices, typed.
    pub plan: &'a crate::train::plan::Plan,
    /// The job file (for messages).
    pub job_path: &'a Path,
    /// `<output_dir>/<name>`.
    pub run_dir: &'a Path,
    /// The model, LoRA attached at strength 1.
    pub model: &'a SdxlModel,
    /// The tokenizer.
    pub tokenizer: &'a ClipTokenizer,
    /// With EMA on: the trained tensors and their average.
    saved: Option<crate::train::ema::SavedWeights>,
    emitted: RefCell<Vec<Event>>,
}

impl<'a> RunView<'a> {
    pub(crate) fn new(
        job: &'a JobConfig,
        plan: &'a crate::train::plan::Plan,
        job_path: &'a Path,
        run_dir: &'a Path,
        model: &'a SdxlModel,
        tokenizer: &'a ClipTokenizer,
        saved: Option<crate::train::ema::SavedWeights>,
    ) -> Self {
        Self {
            job,
            plan,
            job_path,
            run_dir,
            model,
            tokenizer,
            saved,
            emitted: RefCell::new(Vec::new()),
        }
    }

    /// Runs `f` with the LoRA weights the saved files hold: with EMA on,
    /// the average (the trained values are put back afterwards, bit for
    /// bit); otherwise the weights as they are. The validation loss and the
    /// in-training samples use it, so they describe the files (issue 28:
    /// they described the raw weights while the files held the average).
    pub fn with_saved_weights<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.saved {
            Some(saved) => saved.with(f),
            None => f(),
        }
    }

    /// Emits a follow-up event: every observer sees it after the current
    /// event has been seen by all.
    pub fn emit(&self, event: Event) {
        self.emitted.borrow_mut().push(event);
    }
}

/// Acts on a run's events. An error stops the run (the last checkpoint and
/// state stay as they were).
pub trait Observer {
    /// Called for every event, in order.
    fn on_event(&mut self, event: &Event, run: &RunView<'_>) -> Result<()>;
}

/// An [`Observer`] from a closure over the event alone.
pub struct ObserveFn<F>(pub F);

impl<F: FnMut(&Event)> Observer for ObserveFn<F> {
    fn on_event(&mut self, event: &Event, _run: &RunView<'_>) -> Result<()> {
        (self.0)(event);
        Ok(())
    }
}

/// The observers of a run, in the order they see each event.
pub type Observers<'o> = Vec<Box<dyn Observer + 'o>>;

/// Shows `event` to every observer, then the events they emitted.
pub(crate) fn dispatch(
    observers: &mut Observers<'_>,
    view: &RunView<'_>,
    event: Event,
) -> Result<()> {
    let mut queue = VecDeque::from([event]);
    while let Some(e) = queue.pop_front() {
        for o in observers.iter_mut() {
            o.on_event(&e, view)?;
        }
        queue.extend(view.emitted.borrow_mut().drain(..));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event reads back as it was written, under the name `name()`
    /// gives (the UI reads `events.jsonl` through this type).
    #[test]
    fn every_event_reads_back_as_written() {
        let events = [
            Event::Started {
                step: 0,
                total_steps: 9,
                resumed: true,
                datasets: vec![DatasetSummary {
                    folder: "data".into(),
                    usable: 3,
                    files: 4,
                    is_reg: false,
                    samples_per_epoch: 30,
                }],
                modules: 258,
                images: 3,
                samples_per_epoch: 30,
                device: "Cpu".into(),
                notes: vec!["a note".into()],
            },
            Event::Step {
                step: 1,
                loss: Some(0.25),
                preservation: Some(0.125),
                lr: 1e-4,
                seconds: 1.5,
                train_seconds: 1.0,
            },
            Event::Step {
                step: 2,
                loss: None,
                preservation: None,
                lr: 1e-4,
                seconds: 2.5,
                train_seconds: 2.0,
            },
            Event::Validation {
                step: 2,
                loss: 0.5,
                reg_loss: Some(0.75),
                seconds: 3.0,
            },
            Event::Checkpoint {
                step: 2,
                path: "out/x_000000002.safetensors".into(),
                state: "out/state.safetensors".into(),
                last: false,
            },
            Event::Samples {
                step: 2,
                dir: "out/samples".into(),
            },
            Event::Stopped { step: 2 },
            Event::Finished { step: 9 },
        ];
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["event"], e.name(), "{line}");
            assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e, "{line}");
        }
    }
}
