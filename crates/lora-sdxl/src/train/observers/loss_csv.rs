//! `loss.csv`: one row per log line, `step,loss,lr,val_loss,seconds` (the
//! mean training loss since the previous row, the UNet learning rate, the
//! fixed-seed validation loss when measured at that step, and wall-clock
//! seconds since the run started). On `--resume`, rows after the resumed
//! step (written after the last saved state) are dropped, so no step appears
//! twice. A job with regularisation images has a sixth column,
//! `val_reg_loss`, their validation loss.

use super::{LogMerger, LogRecord};
use crate::error::{Result, SdxlError};
use crate::train::events::{Event, Observer, RunView};
use std::io::Write;
use std::path::{Path, PathBuf};

const HEADER: &str = "step,loss,lr,val_loss,seconds\n";
const HEADER_REG: &str = "step,loss,lr,val_loss,seconds,val_reg_loss\n";

/// Writes `loss.csv`.
#[derive(Debug)]
pub struct LossCsv {
    path: PathBuf,
    merger: LogMerger,
    /// The job has regularisation images (the sixth column).
    reg: bool,
}

impl LossCsv {
    /// A log written to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            merger: LogMerger::default(),
            reg: false,
        }
    }

    /// Starts the file: a fresh header, or on resume the rows up to `step`.
    fn start(&self, resumed: bool, step: u64) -> Result<()> {
        let header = if self.reg { HEADER_REG } else { HEADER };
        let kept = match std::fs::read_to_string(&self.path) {
            Ok(old) if resumed => {
                let mut kept = String::from(header);
                for line in old.lines().skip(1) {
                    let row_step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
                    if row_step.is_some_and(|s| s <= step) {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
                kept
            }
            _ => header.to_string(),
        };
        lora_core::io::write_atomic(&self.path, kept.as_bytes())?;
        Ok(())
    }
}

fn append(path: &Path, r: &LogRecord, reg: bool) -> Result<()> {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.6e}")).unwrap_or_default();
    let mut line = format!(
        "{},{},{},{},{:.2}",
        r.step,
        f(r.loss),
        f(r.lr),
        f(r.val),
        r.seconds
    );
    if reg {
        line = format!("{line},{}", f(r.val_reg));
    }
    line.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| SdxlError::io(path, e))?;
    file.write_all(line.as_bytes())
        .map_err(|e| SdxlError::io(path, e))
}

impl Observer for LossCsv {
    fn on_event(&mut self, event: &Event, run: &RunView<'_>) -> Result<()> {
        if let Event::Started { resumed, step, .. } = *event {
            self.reg = run.job.datasets.iter().any(|d| d.is_reg);
            self.start(resumed, step)?;
        }
        for r in self.merger.push(event) {
            append(&self.path, &r, self.reg)?;
        }
        Ok(())
    }
}
