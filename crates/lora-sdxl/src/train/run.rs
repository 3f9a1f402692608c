//! A training run (`lorakit train job.toml`) and its setup: [`Run::prepare`]
//! validates the job, scans the data, loads the model, attaches the LoRA,
//! builds the optimizers and restores a saved state; [`Run::fit`] (in
//! `loop.rs`) trains. [`train`] does both with the standard observers.
//!
//! Frozen base in the train dtype, LoRA parameters in fp32; ε or v targets on
//! the DDPM schedule; uniform timesteps; noise offset; min-SNR-γ; l2/Huber;
//! AdamW with LR schedules and clipping; gradient accumulation. Every random
//! draw of step `s` comes from generators seeded by `(seed, s)`, and the data
//! order by `(seed, epoch)`, so a run resumed from its saved state continues
//! bit-identically on CPU. (The draws use torch's process-wide generator:
//! two trainings running at once in one process lose that exactness.)
//!
//! Files (all written atomically) in `<output_dir>/<name>/`:
//! `<name>_<step:09>.safetensors` every `save_every` steps (newest
//! `max_step_saves_to_keep` kept), `<name>.safetensors` at the end,
//! `state.safetensors` (fp32 LoRA, optimizer moments, position, job hash),
//! `loss.csv` (`step,loss,lr,val_loss,seconds`), `loss.png`, `job.toml` (the
//! job used), `.lock` (the OS lock of the running process; it stays as an
//! empty file, and holds nothing once the process has ended).

use super::data::{Batch, Data};
use super::events::Observers;
use super::inputs::{Env, Inputs};
use super::job::JobConfig;
use super::network::Network;
use super::plan::Plan;
use super::schedule::{NoiseSchedule, ScheduleTables};
use super::state::{remove_stale_temp_files, restore_state, shape_hash, Position, RunLock};
use super::updates::Optimizers;
use crate::error::{Result, SdxlError};
use crate::model::sdxl::{Detected, SdxlModel};
use crate::model::tokenizer::ClipTokenizer;
use lora_core::Prediction;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from `state.safetensors`.
    pub resume: bool,
    /// No progress bar or log lines (warnings and errors still go to `tracing`).
    pub quiet: bool,
    /// Set to stop after the current step (checkpoint + state are saved).
    pub stop: Arc<AtomicBool>,
    /// Stop (as if interrupted) once this optimizer step is done; for tests.
    pub stop_at_step: Option<u64>,
    /// The data-parallel run this process is a rank of (see
    /// [`crate::dist`]): each rank trains its slice of every global batch of
    /// `batch_size × world` items and only rank 0 writes files.
    pub dist: Option<Arc<crate::dist::ProcessGroup>>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Optimizer steps completed in total.
    pub step: u64,
    /// Stopped before `train.steps` (Ctrl-C / stop flag).
    pub interrupted: bool,
    /// The run folder.
    pub run_dir: PathBuf,
    /// The newest LoRA written.
    pub last_lora: Option<PathBuf>,
    /// Validation losses `(step, loss)`.
    pub val_losses: Vec<(u64, f64)>,
    /// Validation losses of the regularisation images `(step, loss)` (jobs
    /// with `is_reg` datasets).
    pub reg_val_losses: Vec<(u64, f64)>,
    /// Images trained on.
    pub images: usize,
    /// How the batches whose latents were not cached were decoded.
    pub decode: super::inputs::DecodeStats,
}

impl TrainReport {
    pub(crate) fn record_validation(&mut self, step: u64, loss: f64, reg: Option<f64>) {
        self.val_losses.push((step, loss));
        self.reg_val_losses.extend(reg.map(|r| (step, r)));
    }
}

/// Runs (or resumes) the job with the standard observers (progress and log
/// lines unless `quiet`, `loss.csv`, `loss.png`, checkpoint rotation,
/// in-training samples). `job_path` names the file in messages.
pub fn train(job: &JobConfig, job_path: &Path, opts: &TrainOptions) -> Result<TrainReport> {
    train_with(job, job_path, opts, Vec::new())
}

/// [`train`] with more observers, which see every event after the standard ones.
pub fn train_with<'o>(
    job: &JobConfig,
    job_path: &Path,
    opts: &TrainOptions,
    extra: Observers<'o>,
) -> Result<TrainReport> {
    let run = Run::prepare(job, job_path, opts)?;
    // the other ranks of a data-parallel run write nothing, print nothing
    let mut observers = Vec::new();
    if run.env.shard.is_main() {
        observers = super::observers::standard(job, &run.env.run_dir, opts.quiet);
        observers.extend(extra);
    }
    run.fit(&mut observers, opts)
}

/// The fixed validation set and when to measure it.
pub(crate) struct Validation {
    pub items: Vec<Batch>,
    /// The same for the first regularisation dataset (empty without).
    pub reg_items: Vec<Batch>,
    pub seed: u64,
    pub every: u64,
}

impl Validation {
    /// The plan's fixed validation set: its first images of the first
    /// training dataset (and of the first regularisation dataset).
    fn of(data: &Data, plan: &super::plan::ValidationPlan) -> Self {
        let n = plan.images;
        Validation {
            items: data.validation_set(n, data.first_dataset(false).unwrap_or(0)),
            reg_items: (data.first_dataset(true))
                .map(|d| data.validation_set(n, d))
                .unwrap_or_default(),
            seed: plan.seed,
            every: plan.every,
        }
    }
}

/// Where a run starts: `state.safetensors` restored into `network` and
/// `optim` with `resume` (when the file exists; without it, step 0 with a
/// warning), else step 0. Returns the position and whether it resumed.
fn resume_position(
    job: &JobConfig,
    run_dir: &Path,
    hash: &str,
    network: &Network,
    optim: &mut Optimizers,
    device: tch::Device,
    resume: bool,
) -> Result<(Position, bool)> {
    let state = run_dir.join("state.safetensors");
    if !resume {
        return Ok((Position::default(), false));
    }
    if !state.exists() {
        tracing::warn!(
            "--resume: {} does not exist yet (the run stopped before its first save): starting from step 0",
            state.display()
        );
        return Ok((Position::default(), false));
    }
    let pos = restore_state(
        &state,
        hash,
        job.job.id.as_deref(),
        network,
        optim.opt.as_mut(),
        optim.ema.as_mut(),
        device,
    )?;
    if pos.step >= job.train.steps {
        return Err(crate::SdxlError::train(format!(
            "--resume: the run already reached step {} of train.steps = {}; raise train.steps to extend it",
            pos.step, job.train.steps
        )));
    }
    Ok((pos, true))
}

/// Warns for each dataset whose latents cannot be cached (a random crop).
fn warn_uncached_crops(job: &JobConfig) {
    let crops = job
        .datasets
        .iter()
        .enumerate()
        .filter(|(_, d)| d.random_crop);
    for (i, d) in crops {
        tracing::warn!(
            "datasets[{i}] ({}): random_crop draws a new crop every epoch, so its latents are encoded at every step instead of cached (as kohya does); set random_crop = false to cache them",
            d.folder_path.display()
        );
    }
}

/// A prepared run: model loaded, LoRA attached, state restored.
pub struct Run {
    pub(crate) env: Env,
    pub(crate) network: Network,
    pub(crate) optim: Optimizers,
    pub(crate) pos: Position,
    pub(crate) resumed: bool,
    pub(crate) hash: String,
    pub(crate) validation: Validation,
    /// When the run started (for `seconds` and kohya's start time).
    pub(crate) started: Instant,
    pub(crate) started_unix: f64,
    /// Settings chosen for this run and why (for [`super::Event::Started`]).
    pub(crate) notes: Vec<String>,
    /// The collectives of a data-parallel run.
    pub(crate) dist: Option<super::shard::DistRun>,
    /// Held while the run exists: one run per folder (by rank 0 of a
    /// data-parallel run).
    _lock: Option<RunLock>,
}

/// The prediction type and zero-terminal-SNR flag of the run: the job's
/// settings win over what the checkpoint declares; the choice and its source
/// go into `notes`. `detected` is updated so that samples use the same.
fn objective_of(
    job: &JobConfig,
    plan: &Plan,
    detected: &mut Detected,
    notes: &mut Vec<String>,
) -> (Prediction, bool) {
    let prediction = plan.prediction.unwrap_or(detected.prediction);
    let ztsnr = job
        .model
        .zero_terminal_snr
        .unwrap_or(detected.zero_terminal_snr);
    let from = |set_in_job: bool| {
        if set_in_job {
            "the job".to_string()
        } else {
            detected.schedule_source.clone()
        }
    };
    notes.push(format!(
        "{} prediction (from {}), zero terminal SNR {} (from {})",
        if prediction == Prediction::V {
            "v"
        } else {
            "epsilon"
        },
        from(plan.prediction.is_some()),
        if ztsnr { "on" } else { "off" },
        from(job.model.zero_terminal_snr.is_some()),
    ));
    detected.prediction = prediction;
    detected.zero_terminal_snr = ztsnr;
    (prediction, ztsnr)
}

impl Run {
    /// Validates the job, scans the data, loads the model in the train
    /// dtype on the job's device, attaches the LoRA, builds the optimizers
    /// and, with `opts.resume`, restores `state.safetensors`.
    ///
    /// One sequence in the order its steps depend on each other: plan, data,
    /// placement, model, run folder and lock, LoRA, optimizers, saved state,
    /// data-parallel group, validation set, input caches. Longer than most
    /// functions because it is that sequence, one call per step, and the
    /// fields it fills.
    pub fn prepare(job: &JobConfig, job_path: &Path, opts: &TrainOptions) -> Result<Self> {
        let plan = job.validate(job_path)?;
        let started = Instant::now();
        let started_unix = lora_core::metadata::now_unix();
        let world = opts.dist.as_ref().map_or(1, |pg| pg.world());
        let main = opts.dist.as_ref().is_none_or(|pg| pg.is_main());
        let data = Data::scan(job, world)?;
        let local_rank = opts.dist.as_ref().map(|pg| pg.local_rank());
        let info = crate::device::DeviceInfo::query();
        let placed = plan.place(job, job_path, &info, local_rank)?;
        let device = placed.device;
        let mut model = SdxlModel::load(&job.model.name_or_path, plan.train_dtype.kind(), device)?;
        model.set_gradient_checkpointing(placed.gradient_checkpointing);
        let mut notes = vec![placed.device_note];
        let (prediction, ztsnr) = objective_of(job, &plan, &mut model.detected, &mut notes);
        notes.push(placed.checkpointing_note);
        if let Some(p) = plan.vram {
            notes.push(p.note());
        }
        let schedule = NoiseSchedule::sdxl(ztsnr);
        let run_dir = job.job.output_dir.join(&job.job.name);
        std::fs::create_dir_all(&run_dir).map_err(|e| SdxlError::io(&run_dir, e))?;

        let lock = if main {
            let lock = RunLock::take(&run_dir)?;
            remove_stale_temp_files(&run_dir);
            Some(lock)
        } else {
            None
        };
        let network = Network::attach(job, &plan, &model, device)?;
        notes.extend(network.notes(job));
        let mut optim = Optimizers::new(job, &plan, &network, &mut notes)?;
        let hash = shape_hash(job, &plan);
        let (mut pos, resumed) = resume_position(
            job,
            &run_dir,
            &hash,
            &network,
            &mut optim,
            device,
            opts.resume,
        )?;
        let global_batch = (job.train.batch_size * world) as u64;
        if let Some(note) = super::shard::resume_note(resumed.then_some(pos), global_batch) {
            tracing::warn!("{note}");
            notes.push(note);
        }
        pos.global_batch = global_batch;
        if main {
            let _ = std::fs::copy(job_path, run_dir.join("job.toml"));
        }
        let dist = match &opts.dist {
            Some(pg) => {
                notes.push(super::shard::note(job, pg));
                let params = network.all_params();
                Some(super::shard::DistRun::new(pg.clone(), &params, pos.step)?)
            }
            None => None,
        };
        let validation = Validation::of(&data, &plan.validation);
        if job.train.cache_latents {
            warn_uncached_crops(job);
        }
        let inputs = Inputs::new(
            &job.model.name_or_path,
            model.vae.kind(),
            &run_dir,
            job.train.cache_latents,
        );
        Ok(Self {
            env: Env {
                job: job.clone(),
                job_path: job_path.to_path_buf(),
                run_dir,
                v_pred: prediction == Prediction::V,
                tables: ScheduleTables::new(&schedule, device),
                timesteps: crate::train::timesteps::TimestepSampler::new(
                    &job.train,
                    plan.timesteps,
                    device,
                ),
                plan,
                model,
                tok: ClipTokenizer::new(),
                data,
                inputs,
                shard: dist
                    .as_ref()
                    .map_or(super::shard::Shard::SINGLE, |d| d.shard()),
            },
            network,
            optim,
            pos,
            resumed,
            notes,
            dist,
            _lock: lock,
            hash,
            validation,
            started,
            started_unix,
        })
    }

    /// The run folder, `<output_dir>/<name>`.
    pub fn run_dir(&self) -> &Path {
        &self.env.run_dir
    }
}
