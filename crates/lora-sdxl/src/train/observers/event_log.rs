//! `events.jsonl`: every [`Event`] of the run as one JSON line
//! (`{"event":"step","step":12,…}`), flushed as it happens, for programs
//! that follow a run from outside its process (`lorakit ui` does). A fresh
//! run starts the file anew; a resumed run appends to it, so the file holds
//! the whole history and its last `started` line begins the current part.

use crate::error::{Result, SdxlError};
use crate::train::events::{Event, Observer, RunView};
use std::io::Write;
use std::path::PathBuf;

/// Writes `events.jsonl`.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl EventLog {
    /// A log written to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }
}

impl Observer for EventLog {
    fn on_event(&mut self, event: &Event, _run: &RunView<'_>) -> Result<()> {
        let io = |e| SdxlError::io(&self.path, e);
        if let Event::Started { resumed, .. } = event {
            let mut open = std::fs::OpenOptions::new();
            open.create(true);
            if *resumed {
                open.append(true);
            } else {
                open.write(true).truncate(true);
            }
            self.file = Some(open.open(&self.path).map_err(io)?);
        }
        if let Some(f) = &mut self.file {
            let mut line = serde_json::to_string(event)
                .map_err(|e| SdxlError::io(&self.path, std::io::Error::other(e)))?;
            line.push('\n');
            f.write_all(line.as_bytes()).map_err(io)?;
        }
        Ok(())
    }
}
