//! Checkpoint rotation: after each step file is written, only the newest
//! `max_step_saves_to_keep` step files stay (chosen by the step in the name,
//! not by file times). The final `<name>.safetensors` is never removed.

use crate::error::Result;
use crate::train::checkpoint::checkpoint_step_of;
use crate::train::events::{Event, Observer, RunView};
use std::path::PathBuf;

/// Keeps the newest `keep` step files.
#[derive(Debug)]
pub struct Rotation {
    keep: usize,
}

impl Rotation {
    /// Keeps `keep` (≥ 1) step files.
    pub fn new(keep: usize) -> Self {
        Self { keep: keep.max(1) }
    }
}

impl Observer for Rotation {
    fn on_event(&mut self, event: &Event, run: &RunView<'_>) -> Result<()> {
        let Event::Checkpoint { last: false, .. } = event else {
            return Ok(());
        };
        let dir = run.run_dir;
        let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(|e| crate::SdxlError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let s = checkpoint_step_of(p.file_name()?.to_str()?, &run.job.job.name)?;
                Some((s, p))
            })
            .collect();
        steps.sort();
        if steps.len() > self.keep {
            for (_, p) in &steps[..steps.len() - self.keep] {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(())
    }
}
