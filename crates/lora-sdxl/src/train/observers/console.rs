//! What a person watching `lorakit train` sees: a progress bar on a
//! terminal, plain lines otherwise (logs, CI, pipes), with the training
//! loss, learning rate, validation loss and the recent training rate
//! (seconds per step over the steps since the previous line, validation,
//! saving and sampling excluded).

use super::{LogMerger, LogRecord};
use crate::error::Result;
use crate::train::events::{Event, Observer, RunView};
use indicatif::{ProgressBar, ProgressStyle};

/// Prints progress to stdout.
#[derive(Debug, Default)]
pub struct Console {
    bar: Option<ProgressBar>,
    merger: LogMerger,
    total: u64,
    /// (step, train_seconds) of the previous line.
    last: (u64, f64),
}

impl Console {
    /// A console observer (a bar only when stdout is a terminal).
    pub fn new() -> Self {
        Self::default()
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None => println!("{s}"),
        }
    }

    fn record(&mut self, r: &LogRecord) {
        let (Some(loss), Some(lr)) = (r.loss, r.lr) else {
            if let Some(v) = r.val {
                let reg = r
                    .val_reg
                    .map(|x| format!(" (reg {x:.5})"))
                    .unwrap_or_default();
                self.line(format!("step {}: validation loss {v:.5}{reg}", r.step));
            }
            return;
        };
        let steps = r.step.saturating_sub(self.last.0).max(1);
        let rate = (r.train_seconds - self.last.1) / steps as f64;
        self.last = (r.step, r.train_seconds);
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {loss:.4}"));
        }
        self.line(format!(
            "step {}/{}: loss {loss:.5}{}, lr {lr:.2e}{}, {rate:.2} s/step",
            r.step,
            self.total,
            (r.preservation)
                .map(|p| format!(", preservation {p:.5}"))
                .unwrap_or_default(),
            r.val
                .map(|v| format!(", validation loss {v:.5}"))
                .unwrap_or_default()
                + &r.val_reg
                    .map(|x| format!(" (reg {x:.5})"))
                    .unwrap_or_default(),
        ));
    }

    fn started(&mut self, event: &Event, run: &RunView<'_>) {
        let Event::Started {
            step,
            total_steps,
            resumed,
            datasets,
            modules,
            images,
            samples_per_epoch,
            device,
            notes,
        } = event
        else {
            return;
        };
        let train = &run.job.train;
        for d in datasets {
            println!(
                "dataset {}: {} usable image(s) of {}",
                d.folder.display(),
                d.usable,
                d.files
            );
        }
        if *resumed {
            println!("resuming from step {step}");
        }
        println!(
            "training {modules} LoRA modules on {images} image(s): {samples_per_epoch} samples per epoch (images × repeats × resolutions), batch {} × accumulation {}, {total_steps} steps, {} on {device}",
            train.batch_size, train.gradient_accumulation, train.dtype
        );
        for n in notes {
            println!("{n}");
        }
        self.total = *total_steps;
        self.last = (*step, 0.0);
        self.bar = std::io::IsTerminal::is_terminal(&std::io::stdout()).then(|| {
            let b = ProgressBar::new(*total_steps).with_position(*step);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
    }
}

impl Observer for Console {
    fn on_event(&mut self, event: &Event, run: &RunView<'_>) -> Result<()> {
        for r in self.merger.push(event) {
            self.record(&r);
        }
        match event {
            Event::Started { .. } => self.started(event, run),
            Event::Step { step, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(*step);
                }
            }
            Event::Samples { step, dir } => {
                self.line(format!("step {step}: samples in {}", dir.display()))
            }
            Event::Stopped { step } => self.line(format!(
                "stopped at step {step}; checkpoint and state saved. Continue with: lorakit train {} --resume",
                run.job_path.display()
            )),
            Event::Finished { .. } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
            }
            _ => {}
        }
        Ok(())
    }
}
