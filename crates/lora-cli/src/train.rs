//! `lorakit train`: runs a job file; Ctrl-C finishes the step, saves a
//! checkpoint and the resumable state, and exits 0; a second Ctrl-C aborts
//! at once (files are written atomically, so nothing is corrupted).
//!
//! Under torchrun's variables (`WORLD_SIZE` > 1, see `lora_sdxl::dist`) the
//! process is one rank of a data-parallel run; `--nproc N` starts N such
//! ranks on this machine (`launch.rs`).

use crate::AnyResult;
use lora_sdxl::dist::{DistEnv, ProcessGroup};
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::JobConfig;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

pub fn run(job_path: &Path, resume: bool, quiet: bool, nproc: usize) -> AnyResult<ExitCode> {
    let job = JobConfig::load(job_path)?;
    job.validate(job_path)?;
    let env = DistEnv::from_env()?;
    if nproc > 1 {
        if let Some(env) = env {
            return Err(format!(
                "--nproc {nproc}: this process is already rank {} of a run of {} (WORLD_SIZE is set); drop --nproc under torchrun",
                env.rank, env.world
            )
            .into());
        }
        return crate::launch::launch(job_path, resume, quiet, nproc);
    }
    let dist = env
        .map(|e| ProcessGroup::join(&e))
        .transpose()?
        .map(Arc::new);
    let main = dist.as_ref().is_none_or(|pg| pg.is_main());
    let stop = crate::console::stop_on_ctrl_c(
        "stopping after this step (saving a checkpoint and the state); press Ctrl-C again to abort now",
        "aborted; the last saved checkpoint and state are intact",
    );
    let report = train(
        &job,
        job_path,
        &TrainOptions {
            resume,
            quiet: quiet || !main,
            stop,
            stop_at_step: None,
            dist,
        },
    )?;
    if !report.interrupted && main {
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
