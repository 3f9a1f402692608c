//! `loss.png`: the training loss (mean per log line) and the fixed-seed
//! validation loss by step, drawn from `loss.csv` at every checkpoint.

use crate::error::{Result, SdxlError};
use crate::train::events::{Event, Observer, RunView};
use std::path::{Path, PathBuf};

/// Redraws `png` from `csv` at every [`Event::Checkpoint`] (register it
/// after [`super::loss_csv::LossCsv`], which writes the CSV first).
#[derive(Debug)]
pub struct LossChart {
    csv: PathBuf,
    png: PathBuf,
    title: String,
}

impl LossChart {
    /// A chart of `csv` drawn into `png` under `title`.
    pub fn new(csv: PathBuf, png: PathBuf, title: String) -> Self {
        Self { csv, png, title }
    }
}

impl Observer for LossChart {
    fn on_event(&mut self, event: &Event, _run: &RunView<'_>) -> Result<()> {
        if let Event::Checkpoint { .. } = event {
            write_loss_chart(&self.csv, &self.png, &self.title)?;
        }
        Ok(())
    }
}

/// Draws `loss.png` from `loss.csv`: the training loss (mean per log line)
/// and the fixed-seed validation loss by step.
pub fn write_loss_chart(csv: &Path, png: &Path, title: &str) -> Result<()> {
    use crate::render::{line_chart, save_png, Series};
    let text = std::fs::read_to_string(csv).map_err(|e| SdxlError::io(csv, e))?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        let num = |i: usize| cols.get(i).and_then(|v| v.parse::<f64>().ok());
        let Some(step) = num(0) else { continue };
        if let Some(l) = num(1) {
            train.push((step, l));
        }
        if let Some(v) = num(3) {
            val.push((step, v));
        }
    }
    let series = [
        Series {
            label: "training loss".into(),
            color: image::Rgb([70, 130, 200]),
            points: train,
            dots: false,
        },
        Series {
            label: "validation loss (fixed seed)".into(),
            color: image::Rgb([220, 80, 30]),
            points: val,
            dots: true,
        },
    ];
    let img = line_chart(title, "step", &series, 900, 500);
    save_png(png, &img, &[("software", &crate::sample::grid::software())])
        .map_err(|e| crate::SdxlError::train(e.to_string()))
}
