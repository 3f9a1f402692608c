//! `lorakit train`: runs a job file; Ctrl-C finishes the step, saves a
//! checkpoint and the resumable state, and exits 0; a second Ctrl-C aborts
//! at once (files are written atomically, so nothing is corrupted).

use crate::AnyResult;
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::JobConfig;
use std::path::Path;
use std::process::ExitCode;

pub fn run(job_path: &Path, resume: bool, quiet: bool) -> AnyResult<ExitCode> {
    let job = JobConfig::load(job_path)?;
    job.validate(job_path)?;
    let stop = crate::console::stop_on_ctrl_c(
        "stopping after this step (saving a checkpoint and the state); press Ctrl-C again to abort now",
        "aborted; the last saved checkpoint and state are intact",
    );
    let report = train(
        &job,
        job_path,
        &TrainOptions {
            resume,
            quiet,
            stop,
            stop_at_step: None,
        },
    )?;
    if !report.interrupted {
        println!(
            "done: {} steps; LoRA files in {} (newest: {})",
            report.step,
            report.run_dir.display(),
            report
                .last_lora
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
