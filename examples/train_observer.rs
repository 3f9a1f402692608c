//! Watching a training run from a library: train a small job on a tiny
//! SDXL-architecture model (random weights, real single-file layout) and a
//! synthetic character dataset on CPU, and print every event the loop emits
//! as one JSON line — what a GUI, a web page or a log shipper would consume.
//! A second observer stops the run at step 6 through the stop flag, as a
//! "Stop" button would.
//!
//! ```sh
//! cargo run --release --example train_observer            # into a temp folder
//! cargo run --release --example train_observer -- OUT_DIR
//! ```

use lorakit::sdxl::train::{train_with, Event, ObserveFn, Observers, TrainOptions};
use lorakit::sdxl::{JobConfig, SdxlConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let out = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out)?;
    let data = out.join("dataset");
    lorakit::data::synthetic::write_character_dataset(&data, 6, 256, 256, "myakumyaku-san", 7)?;
    let model = out.join("tiny_sdxl.safetensors");
    lorakit::sdxl::synthetic::write_random_checkpoint(
        &model,
        &SdxlConfig::tiny(),
        3,
        tch::Kind::Float,
    )?;

    let job_path = out.join("job.toml");
    let text = JobConfig::template(model.to_str(), data.to_str(), Some("myakumyaku-san"), None);
    std::fs::write(&job_path, &text)?;
    let mut job = JobConfig::load(&job_path)?;
    job.job.device = Some("cpu".into());
    job.network.linear = 4;
    job.network.conv = 2;
    job.save.save_every = 4;
    job.train.steps = 8;
    job.train.lr = 1e-3;
    job.train.dtype = "fp32".into();
    job.train.gradient_checkpointing = false.into();
    job.datasets[0].resolution = vec![256];
    job.validation.images = Some(2);

    let stop = Arc::new(AtomicBool::new(false));
    let opts = TrainOptions {
        quiet: true, // no progress bar: the JSON lines are the output
        stop: stop.clone(),
        ..TrainOptions::default()
    };
    let print = ObserveFn(|e: &Event| match serde_json::to_string(e) {
        Ok(line) => println!("{line}"),
        Err(err) => eprintln!("cannot serialise an event: {err}"),
    });
    let stopper = ObserveFn(move |e: &Event| {
        if let Event::Step { step: 5, .. } = e {
            stop.store(true, Ordering::SeqCst); // honoured after the next step
        }
    });
    let observers: Observers = vec![Box::new(print), Box::new(stopper)];
    let report = train_with(&job, &job_path, &opts, observers)?;
    eprintln!(
        "stopped: {}, at step {}; files in {}",
        report.interrupted,
        report.step,
        report.run_dir.display()
    );
    Ok(())
}
