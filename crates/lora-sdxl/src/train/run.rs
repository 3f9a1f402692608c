//! The SDXL LoRA training loop (`lorakit train job.toml`).
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
//! `loss.csv` (`step,loss,lr,val_loss,seconds`), `job.toml` (the job used).

use crate::conditioning::{encode_batch, time_ids};
use crate::error::{Result, SdxlError};
use crate::job::JobConfig;
use crate::model::SdxlModel;
use crate::optim::{clip_grad_norm, AdamW};
use crate::schedule::{per_sample_loss, LrSchedule, NoiseSchedule, ScheduleTables};
use crate::targets::{lora_targets, TargetScope};
use crate::tokenizer::ClipTokenizer;
use lora_core::{
    Component, Dropouts, LoraAdapter, LoraSet, ModuleKey, Prediction, TrainingMetadata,
};
use lora_data::caption::{CaptionProcessing, TagStats};
use lora_data::image_io::DecodeLimits;
use lora_data::loader::{derived_rng, load_batch, plan_epoch, LoadedBatch, PlannedBatch};
use lora_data::{ImageEntry, PlanConfig, ScanOptions, Severity};
use rand::Rng;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from `state.safetensors`.
    pub resume: bool,
    /// Only warnings and errors.
    pub quiet: bool,
    /// Set to stop after the current step (checkpoint + state are saved).
    pub stop: Arc<AtomicBool>,
    /// Stop (as if interrupted) once this optimizer step is done; for tests.
    pub stop_at_step: Option<u64>,
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
    /// Images trained on.
    pub images: usize,
}

fn terr(reason: impl Into<String>) -> SdxlError {
    SdxlError::Checkpoint {
        path: PathBuf::new(),
        reason: reason.into(),
    }
}

struct Leaf {
    key: ModuleKey,
    down: Tensor,
    up: Tensor,
    alpha: f64,
}

struct Sample {
    image: usize,
    dataset: usize,
}

/// Everything the loop needs about the data.
struct Data {
    /// Shared with the prefetch thread.
    images: std::sync::Arc<Vec<ImageEntry>>,
    dataset_of: Vec<usize>,
    plans: Vec<PlanConfig>,
    captions: Vec<CaptionProcessing>,
}

impl Data {
    /// The epoch's batches over every dataset (each planned with its own
    /// resolutions), shuffled together.
    fn epoch(&self, epoch: u64, seed: u64) -> Vec<(PlannedBatch, Vec<Sample>)> {
        let mut all = Vec::new();
        for (d, plan) in self.plans.iter().enumerate() {
            let idx: Vec<usize> = (0..self.images.len())
                .filter(|&i| self.dataset_of[i] == d)
                .collect();
            let imgs: Vec<ImageEntry> = idx.iter().map(|&i| self.images[i].clone()).collect();
            for mut b in plan_epoch(
                &imgs,
                &PlanConfig {
                    seed: plan.seed.wrapping_add(d as u64),
                    ..plan.clone()
                },
                epoch,
            ) {
                let samples = b
                    .items
                    .iter()
                    .map(|it| Sample {
                        image: idx[it.image],
                        dataset: d,
                    })
                    .collect();
                for it in &mut b.items {
                    it.image = idx[it.image];
                }
                all.push((b, samples));
            }
        }
        let mut rng = derived_rng(seed, &[2, epoch]);
        for i in (1..all.len()).rev() {
            let j = rng.gen_range(0..=i);
            all.swap(i, j);
        }
        all
    }
}

fn scan_data(job: &JobConfig, quiet: bool) -> Result<Data> {
    let mut images = Vec::new();
    let mut dataset_of = Vec::new();
    let mut plans = Vec::new();
    let mut captions = Vec::new();
    for (d, ds) in job.datasets.iter().enumerate() {
        let scan = lora_data::scan(
            &ds.folder_path,
            &ScanOptions {
                caption_ext: ds.caption_ext.clone(),
                num_repeats: ds.num_repeats,
                ..Default::default()
            },
        )
        .map_err(|e| terr(e.to_string()))?;
        for p in scan
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
        {
            tracing::warn!(
                "skipping {}: {}",
                ds.folder_path.join(&p.file).display(),
                p.message
            );
        }
        if !quiet {
            println!(
                "dataset {}: {} usable image(s) of {}",
                ds.folder_path.display(),
                scan.images.len(),
                scan.image_files
            );
        }
        dataset_of.extend(std::iter::repeat_n(d, scan.images.len()));
        images.extend(scan.images);
        plans.push(PlanConfig {
            resolutions: ds.resolution.clone(),
            batch_size: job.train.batch_size,
            flip_x: ds.flip_x,
            random_crop: ds.random_crop,
            seed: job.job.seed,
        });
        captions.push(CaptionProcessing {
            trigger: job.job.trigger_word.clone(),
            keep_tokens: ds.keep_tokens,
            shuffle: ds.shuffle_tokens,
            caption_dropout_rate: ds.caption_dropout_rate,
            tag_dropout_rate: ds.tag_dropout_rate,
        });
    }
    if images.is_empty() {
        let dirs: Vec<String> = job
            .datasets
            .iter()
            .map(|d| d.folder_path.display().to_string())
            .collect();
        return Err(terr(format!(
            "no usable image in {}: nothing to train on (run `lorakit dataset check` on the folder)",
            dirs.join(", ")
        )));
    }
    Ok(Data {
        images: std::sync::Arc::new(images),
        dataset_of,
        plans,
        captions,
    })
}

/// Hash of the settings a saved state depends on (ranks, alphas, targets, base model).
fn shape_hash(job: &JobConfig) -> String {
    let model_size = std::fs::metadata(&job.model.name_or_path)
        .map(|m| m.len())
        .unwrap_or(0);
    let n = &job.network;
    let s = format!(
        "v1 linear={} alpha={} conv={} conv_alpha={} unet={} te={} model={} size={}",
        n.linear,
        n.linear_alpha,
        n.conv,
        n.conv_alpha,
        job.train.train_unet,
        job.train.train_text_encoder,
        job.model
            .name_or_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model_size
    );
    lora_core::io::hex(&<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()))[..16].to_string()
}

/// A validated job dtype (`fp16`, `bf16`, `fp32`).
fn kind_of(name: &str) -> Kind {
    lora_core::io::kind_from_name(name).unwrap_or(Kind::Float)
}

/// Runs (or resumes) the job. `job_path` names the file in messages.
pub fn train(job: &JobConfig, job_path: &Path, opts: &TrainOptions) -> Result<TrainReport> {
    job.validate(job_path).map_err(|e| terr(e.to_string()))?;
    let t0 = Instant::now();
    let say = |s: String| {
        if !opts.quiet {
            println!("{s}");
        }
    };
    let data = scan_data(job, opts.quiet)?;
    let device = crate::model::resolve_device(job.job.device.as_deref())
        .map_err(|e| terr(format!("{}: job.device: {e}", job_path.display())))?;
    let mut model = SdxlModel::load(&job.model.name_or_path, kind_of(&job.train.dtype), device)?;
    let prediction = match job.model.prediction.as_deref() {
        Some("v_prediction") => Prediction::V,
        Some(_) => Prediction::Epsilon,
        None => model.detected.prediction,
    };
    model.set_gradient_checkpointing(job.train.gradient_checkpointing);
    // The job's settings win over the checkpoint's markers (samples use them too).
    model.detected.prediction = prediction;
    model.detected.zero_terminal_snr |= job.model.zero_terminal_snr;
    let model = model;
    let v_pred = prediction == Prediction::V;
    let schedule =
        NoiseSchedule::sdxl(job.model.zero_terminal_snr || model.detected.zero_terminal_snr);
    let tables = schedule.tables(device);
    let run_dir = job.job.output_dir.join(&job.job.name);
    std::fs::create_dir_all(&run_dir).map_err(|e| SdxlError::io(&run_dir, e))?;

    // ---- LoRA parameters (fp32 leaves) attached to the slots
    let n = &job.network;
    let scope = TargetScope {
        unet: job.train.train_unet,
        unet_conv: job.train.train_unet && n.conv > 0,
        te1: job.train.train_text_encoder,
        te2: job.train.train_text_encoder,
    };
    tch::manual_seed(job.job.seed as i64);
    let mut leaves = Vec::new();
    let mut set = LoraSet::new();
    for t in lora_targets(&model.detected.config, scope) {
        let (rank, alpha) = if t.uses_conv_rank() {
            (n.conv, n.conv_alpha)
        } else {
            (n.linear, n.linear_alpha)
        };
        let mut a = LoraAdapter::new(
            t.in_features,
            t.out_features,
            rank,
            Some(alpha),
            t.geometry,
            Kind::Float,
            device,
        )?;
        let down = a.down().set_requires_grad(true);
        let up = a.up().set_requires_grad(true);
        a.set_weights(down.shallow_clone(), up.shallow_clone())?;
        a.set_dropouts(Dropouts {
            dropout: n.dropout,
            rank_dropout: n.rank_dropout,
            module_dropout: n.module_dropout,
        })?;
        leaves.push(Leaf {
            key: t.key.clone(),
            down,
            up,
            alpha,
        });
        set.insert(t.key, a);
    }
    model.attach_lora(set, 1.0)?;
    let params = |te: bool| -> Vec<Tensor> {
        leaves
            .iter()
            .filter(|l| (l.key.component != Component::Unet) == te)
            .flat_map(|l| [l.down.shallow_clone(), l.up.shallow_clone()])
            .collect()
    };
    let (unet_params, te_params) = (params(false), params(true));
    let t = &job.train;
    let shallow = |v: &[Tensor]| v.iter().map(|p| p.shallow_clone()).collect::<Vec<_>>();
    let make = if t.optimizer == "adamw8bit" {
        AdamW::new_8bit
    } else {
        AdamW::new
    };
    let mut opt_unet = make(shallow(&unet_params), 0.9, 0.999, 1e-8, t.weight_decay);
    let mut opt_te = make(shallow(&te_params), 0.9, 0.999, 1e-8, t.weight_decay);
    let all_params: Vec<Tensor> = unet_params
        .iter()
        .chain(&te_params)
        .map(|p| p.shallow_clone())
        .collect();
    let lr_schedule = LrSchedule::parse(&t.lr_scheduler).ok_or_else(|| terr("bad lr_scheduler"))?;
    let te_lr = t.text_encoder_lr.unwrap_or(t.lr);

    // ---- position, possibly from a saved state
    let hash = shape_hash(job);
    let state_path = run_dir.join("state.safetensors");
    let (mut step, mut epoch, mut batch_in_epoch) = (0u64, 0u64, 0usize);
    if opts.resume {
        let st =
            lora_core::io::read_tensors(&state_path).map_err(|e| terr(format!("--resume: {e}")))?;
        let md = &st.metadata;
        if md.get("lorakit.job_hash") != Some(&hash) {
            return Err(terr(format!(
                "--resume: {} was saved for other network/model settings (rank, alpha, conv, trained parts or base model changed); start a new run (another job.name) or restore those settings",
                state_path.display()
            )));
        }
        let num = |k: &str| {
            md.get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| terr(format!("--resume: state lacks {k}")))
        };
        step = num("lorakit.step")?;
        epoch = num("lorakit.epoch")?;
        batch_in_epoch = num("lorakit.batch")? as usize;
        let map: BTreeMap<String, Tensor> = st.tensors.into_iter().collect();
        let get = |k: String| {
            map.get(&k)
                .map(|t| t.to_device(device))
                .ok_or_else(|| terr(format!("--resume: state lacks `{k}`")))
        };
        tch::no_grad(|| -> Result<()> {
            for l in &leaves {
                let name = l.key.kohya_name();
                l.down.shallow_clone().copy_(&get(format!("{name}.down"))?);
                l.up.shallow_clone().copy_(&get(format!("{name}.up"))?);
            }
            Ok(())
        })?;
        for (tag, opt) in [("unet", &mut opt_unet), ("te", &mut opt_te)] {
            let steps = num(&format!("lorakit.adam.{tag}.steps"))?;
            let lookup = |k: &str| map.get(k).map(|t| t.shallow_clone());
            opt.load_state(&format!("adam.{tag}"), &lookup, steps)
                .map_err(|k| terr(format!("--resume: state lacks `{k}`")))?;
        }
        say(format!(
            "resuming from step {step} (epoch {}, batch {batch_in_epoch})",
            epoch + 1
        ));
        if step >= t.steps {
            return Err(terr(format!(
                "--resume: the run already reached step {step} of train.steps = {}; raise train.steps to extend it",
                t.steps
            )));
        }
    }

    let tok = ClipTokenizer::new();
    let images = data.images.len();
    let per_epoch: u64 = data
        .plans
        .iter()
        .enumerate()
        .map(|(d, p)| {
            let reps: u64 = data
                .images
                .iter()
                .zip(&data.dataset_of)
                .filter(|(_, &ds)| ds == d)
                .map(|(i, _)| i.repeats as u64)
                .sum();
            reps * p.resolutions.len() as u64
        })
        .sum();
    say(format!(
        "training {} LoRA modules on {images} image(s): {per_epoch} samples per epoch (images × repeats × resolutions), batch {} × accumulation {}, {} steps, {} on {:?}",
        leaves.len(),
        t.batch_size,
        t.gradient_accumulation,
        t.steps,
        t.dtype,
        device
    ));
    let _ = std::fs::copy(job_path, run_dir.join("job.toml"));

    // ---- fixed validation set
    let val_items: Vec<(PlannedBatch, Vec<Sample>)> = {
        let n_val = job.validation.images.unwrap_or(4).max(1);
        let mut v = Vec::new();
        let plan = PlanConfig {
            flip_x: false,
            random_crop: false,
            batch_size: 1,
            ..data.plans[0].clone()
        };
        let imgs: Vec<ImageEntry> = data
            .images
            .iter()
            .zip(&data.dataset_of)
            .filter(|(_, &d)| d == 0)
            .map(|(i, _)| i.clone())
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for b in plan_epoch(&imgs, &plan, 0) {
            if v.len() >= n_val {
                break;
            }
            let it = &b.items[0];
            if seen.insert(it.image) {
                v.push((
                    b.clone(),
                    vec![Sample {
                        image: it.image,
                        dataset: 0,
                    }],
                ));
            }
        }
        v
    };
    let val_seed = job
        .validation
        .seed
        .unwrap_or(job.job.seed ^ 0x7661_6c69_6461_7465);
    let val_every = job.validation.every.unwrap_or(job.save.save_every);

    // latent cache under the run's output (never in the dataset), keyed by image
    // content, bucket, crop, flip and the VAE's identity (model file name, size, mtime)
    let vae_id = {
        let p = &job.model.name_or_path;
        let m = std::fs::metadata(p).ok();
        let mtime = m
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!(
            "{}:{}:{mtime}",
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            m.as_ref().map(|m| m.len()).unwrap_or(0)
        )
    };
    let cache = job
        .train
        .cache_latents
        .then(|| lora_data::TensorCache::new(run_dir.join("cache").join("latents")));
    let ctx = Ctx {
        job,
        model: &model,
        tok: &tok,
        tables: &tables,
        data: &data,
        v_pred,
        cache,
        memory: Default::default(),
        text_memory: Default::default(),
        prefetched: Default::default(),
        vae_id,
    };
    let mut report = TrainReport {
        step,
        interrupted: false,
        run_dir: run_dir.clone(),
        last_lora: None,
        val_losses: Vec::new(),
        images,
    };
    let csv_path = run_dir.join("loss.csv");
    if !csv_path.exists() || !opts.resume {
        lora_core::io::write_atomic(&csv_path, b"step,loss,lr,val_loss,seconds\n")?;
    }
    if !opts.resume {
        let v = ctx.validation_loss(&val_items, val_seed)?;
        report.val_losses.push((0, v));
        append_csv(
            &csv_path,
            0,
            None,
            None,
            Some(v),
            t0.elapsed().as_secs_f64(),
        )?;
        say(format!("step 0: validation loss {v:.5}"));
    }

    if !opts.resume && !job.sample.disable {
        training_samples(job, &model, &tok, &run_dir, 0, opts.quiet)?;
    }

    // ---- the loop
    let accum = t.gradient_accumulation as u64;
    let mut loss_acc = Tensor::zeros([], (Kind::Float, device));
    let mut loss_n = 0u64;
    let mut micro = 0u64;
    model.slots.set_training(true);
    // a progress bar on a terminal; plain lines otherwise (logs, CI, pipes)
    let bar = (!opts.quiet && std::io::IsTerminal::is_terminal(&std::io::stdout())).then(|| {
        let b = indicatif::ProgressBar::new(t.steps).with_position(step);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    'outer: loop {
        let batches = data.epoch(epoch, job.job.seed);
        while batch_in_epoch < batches.len() {
            let (planned, samples) = &batches[batch_in_epoch];
            batch_in_epoch += 1;
            // decode the next batch's images while this one trains
            if let Some((next, _)) = batches.get(batch_in_epoch) {
                ctx.prefetch(next);
            }
            let micro_id = step * accum + micro;
            let loss = ctx.micro_step(planned, samples, micro_id)?;
            (&loss / accum as f64).backward();
            loss_acc += loss.detach();
            loss_n += 1;
            micro += 1;
            if micro < accum {
                continue;
            }
            micro = 0;
            if t.max_grad_norm > 0.0 {
                let _ = clip_grad_norm(&all_params, t.max_grad_norm);
            }
            let lr = lr_schedule.lr(t.lr, step, t.steps, t.warmup_steps);
            let lr_te = lr_schedule.lr(te_lr, step, t.steps, t.warmup_steps);
            opt_unet.step(lr);
            opt_te.step(lr_te);
            opt_unet.zero_grad();
            opt_te.zero_grad();
            step += 1;
            report.step = step;
            if let Some(b) = &bar {
                b.set_position(step);
            }
            let stopping = opts.stop.load(Ordering::SeqCst) || opts.stop_at_step == Some(step);
            let log_now =
                step % 10 == 0 || step == t.steps || step % job.save.save_every == 0 || stopping;
            if log_now {
                let mean = loss_acc.double_value(&[]) / loss_n.max(1) as f64; // one host sync per log line
                loss_acc = Tensor::zeros([], (Kind::Float, device));
                loss_n = 0;
                let val = if step % val_every == 0 || step == t.steps {
                    model.slots.set_training(false);
                    let v = ctx.validation_loss(&val_items, val_seed)?;
                    model.slots.set_training(true);
                    report.val_losses.push((step, v));
                    Some(v)
                } else {
                    None
                };
                let secs = t0.elapsed().as_secs_f64();
                append_csv(&csv_path, step, Some(mean), Some(lr), val, secs)?;
                if let Some(b) = &bar {
                    b.set_message(format!("loss {mean:.4}"));
                }
                let line = |s: String| match &bar {
                    Some(b) => b.println(s),
                    None => say(s),
                };
                line(format!(
                    "step {step}/{}: loss {mean:.5}, lr {lr:.2e}{}, {:.2} s/step",
                    t.steps,
                    val.map(|v| format!(", validation loss {v:.5}"))
                        .unwrap_or_default(),
                    secs / step.max(1) as f64
                ));
            }
            let save_now = step % job.save.save_every == 0 || step == t.steps || stopping;
            if save_now {
                let p = save_checkpoint(
                    job,
                    &run_dir,
                    &leaves,
                    step,
                    epoch,
                    &data,
                    &model,
                    t0,
                    step == t.steps && !stopping,
                )?;
                save_state(
                    &state_path,
                    &leaves,
                    &opt_unet,
                    &opt_te,
                    &hash,
                    step,
                    epoch,
                    batch_in_epoch,
                )?;
                report.last_lora = Some(p);
                write_loss_chart(
                    &csv_path,
                    &run_dir.join("loss.png"),
                    &format!("{}: loss by step", job.job.name),
                )?;
            }
            let sample_now =
                !job.sample.disable && (step % job.sample.sample_every == 0 || step == t.steps);
            if sample_now {
                model.slots.set_training(false);
                let r = training_samples(job, &model, &tok, &run_dir, step, true);
                model.slots.set_training(true);
                let dir = r?;
                if let Some(b) = &bar {
                    b.println(format!("step {step}: samples in {}", dir.display()));
                } else {
                    say(format!("step {step}: samples in {}", dir.display()));
                }
            }
            if stopping && step < t.steps {
                report.interrupted = true;
                say(format!(
                    "stopped at step {step}; checkpoint and state saved. Continue with: lorakit train {} --resume",
                    job_path.display()
                ));
                break 'outer;
            }
            if step >= t.steps {
                break 'outer;
            }
        }
        epoch += 1;
        batch_in_epoch = 0;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    model.slots.set_training(false);
    model.detach_loras();
    Ok(report)
}

/// Renders the job's sample prompts with the LoRA under training (at
/// `sample.strength`) into `<run>/samples/<step>_p<row>.png` and refreshes
/// `<run>/samples/grid.png` (prompts × steps).
fn training_samples(
    job: &JobConfig,
    model: &SdxlModel,
    tok: &ClipTokenizer,
    run_dir: &Path,
    step: u64,
    quiet: bool,
) -> Result<PathBuf> {
    use crate::compare::{parameters_text, software, training_sample_name, training_samples_grid};
    let s = &job.sample;
    let dir = run_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| SdxlError::io(&dir, e))?;
    let trigger = job.job.trigger_word.as_deref();
    let prompts: Vec<String> = s
        .prompts
        .iter()
        .map(|p| s.generate_params(p, trigger).prompt)
        .collect();
    let model_name = job
        .model
        .name_or_path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lora = crate::compare::LoraUse {
        path: PathBuf::from(format!("{}_{step:09}.safetensors", job.job.name)),
        strength: s.strength,
    };
    model.slots.set_multiplier(s.strength);
    let result = (|| -> Result<()> {
        for (r, prompt) in s.prompts.iter().enumerate() {
            let p = s.generate_params(prompt, trigger);
            let img = crate::pipeline::txt2img(model, tok, &p, &mut |_| {})?.remove(0);
            let text = parameters_text(&p, &model_name, std::slice::from_ref(&lora), &[]);
            lora_data::render::save_png(
                dir.join(training_sample_name(step, r)),
                &img,
                &[("parameters", &text), ("software", &software())],
            )
            .map_err(|e| terr(e.to_string()))?;
        }
        Ok(())
    })();
    model.slots.set_multiplier(1.0);
    result?;
    let (sampler, schedule) = s.generate_params("", None).sampler.a1111_names();
    let title = format!(
        "{} | seed {} | {} steps | {sampler} {schedule} | CFG {} | strength {} | {}x{}",
        job.job.name, s.seed, s.sample_steps, s.guidance_scale, s.strength, s.width, s.height
    );
    training_samples_grid(&dir, &prompts, &title)?;
    if !quiet {
        println!("step {step}: samples in {}", dir.display());
    }
    Ok(dir)
}

struct Ctx<'a> {
    job: &'a JobConfig,
    model: &'a SdxlModel,
    tok: &'a ClipTokenizer,
    tables: &'a ScheduleTables,
    data: &'a Data,
    v_pred: bool,
    cache: Option<lora_data::TensorCache>,
    /// Latent moments already read or computed this run (by cache key).
    memory: std::cell::RefCell<std::collections::HashMap<String, Tensor>>,
    /// The next batch's pixels, decoded on a background thread while the
    /// current step runs (only for batches whose latents are not cached).
    prefetched: std::cell::RefCell<Option<(PlannedBatch, std::thread::JoinHandle<LoadedBatch>)>>,
    /// `cache_text_embeddings`: (context, pooled) per caption, computed once.
    text_memory: std::cell::RefCell<std::collections::HashMap<String, (Tensor, Tensor)>>,
    vae_id: String,
}

impl Ctx<'_> {
    /// Scaled latents of a planned batch: VAE moments (from the content-keyed
    /// cache when `cache_latents`, else encoded now), then a seeded sample.
    /// Cache keys of a batch's latents (`None` without `cache_latents`).
    fn latent_keys(&self, planned: &PlannedBatch) -> Option<Vec<String>> {
        self.cache.as_ref().map(|_| {
            planned
                .items
                .iter()
                .map(|it| {
                    lora_data::LatentKey {
                        image_hash: self.data.images[it.image].content_hash.clone(),
                        bucket: it.placement.bucket,
                        crop: it.placement.crop,
                        flip: it.flip,
                        vae_id: self.vae_id.clone(),
                    }
                    .canonical()
                })
                .collect()
        })
    }

    /// Starts decoding `planned` on a background thread unless its latents
    /// are already cached (memory or disk) or it is already under way.
    fn prefetch(&self, planned: &PlannedBatch) {
        if let (Some(c), Some(keys)) = (&self.cache, self.latent_keys(planned)) {
            let memory = self.memory.borrow();
            if keys
                .iter()
                .all(|k| memory.contains_key(k) || c.path_for(k).exists())
            {
                return;
            }
        }
        let mut slot = self.prefetched.borrow_mut();
        if slot.as_ref().is_some_and(|(p, _)| p == planned) {
            return;
        }
        let images = self.data.images.clone();
        let batch = planned.clone();
        let handle = std::thread::spawn(move || {
            load_batch(
                &images,
                &batch,
                0,
                &DecodeLimits::default(),
                [255, 255, 255],
            )
        });
        // A stale prefetch (the plan moved on) is simply dropped when done.
        *slot = Some((planned.clone(), handle));
    }

    fn latents(&self, planned: &PlannedBatch, seed: u64) -> Result<Tensor> {
        let keys = self.latent_keys(planned);
        let device = self.model.unet_device();
        let cached: Option<Vec<Tensor>> = match (&self.cache, &keys) {
            (Some(c), Some(keys)) => keys
                .iter()
                .map(|k| {
                    // memory first: after the first epoch no step re-reads the disk
                    if let Some(t) = self.memory.borrow().get(k) {
                        return Some(t.shallow_clone());
                    }
                    let t = c
                        .get(k)
                        .and_then(|mut m| m.remove("moments"))?
                        .to_device(device);
                    self.memory
                        .borrow_mut()
                        .insert(k.clone(), t.shallow_clone());
                    Some(t)
                })
                .collect(),
            _ => None,
        };
        let moments = match cached {
            Some(m) => Tensor::stack(&m, 0).to_device(device),
            None => {
                let pixels = self.pixels(planned)?;
                let (mean, logvar) = tch::no_grad(|| self.model.vae.encode_moments(&pixels));
                let m = Tensor::cat(&[mean.to_kind(Kind::Float), logvar.to_kind(Kind::Float)], 1);
                if let (Some(c), Some(keys)) = (&self.cache, &keys) {
                    for (i, k) in keys.iter().enumerate() {
                        c.put(k, &[("moments", &m.get(i as i64).to_device(Device::Cpu))])
                            .map_err(|e| terr(e.to_string()))?;
                        self.memory.borrow_mut().insert(k.clone(), m.get(i as i64));
                    }
                }
                m
            }
        };
        Ok(tch::no_grad(|| {
            let parts = moments.chunk(2, 1);
            tch::manual_seed(seed as i64);
            let z = &parts[0] + (&parts[1] * 0.5).exp() * parts[0].randn_like();
            z * self.model.vae.config.scaling_factor
        }))
    }

    fn conditioning(
        &self,
        planned: &PlannedBatch,
        samples: &[Sample],
        captions: Vec<String>,
    ) -> Result<(Tensor, Tensor)> {
        let device = self.model.unet_device();
        let train_te = self.job.train.train_text_encoder;
        let enc = || encode_batch(self.tok, &self.model.te1, &self.model.te2, &captions);
        let cond = if self.job.train.cache_text_embeddings && !train_te {
            self.cached_text(&captions)?
        } else if train_te {
            enc()?
        } else {
            tch::no_grad(enc)?
        };
        let ids: Vec<Tensor> = planned
            .items
            .iter()
            .zip(samples)
            .map(|(it, s)| {
                let img = &self.data.images[s.image];
                let c =
                    lora_data::SizeConditioning::new(img.width, img.height, &it.placement, it.flip);
                time_ids(c.original_hw, c.crop_top_left, c.target_hw, device)
            })
            .collect();
        let y = crate::unet::vector_conditioning(&cond.pooled, &Tensor::cat(&ids, 0));
        Ok((cond.context, y))
    }

    /// Text conditioning from the in-memory cache (`cache_text_embeddings`):
    /// each caption is encoded alone once; a batch of captions with different
    /// chunk counts repeats contexts to a common length (attention over
    /// repeated tokens is unchanged).
    fn cached_text(&self, captions: &[String]) -> Result<crate::conditioning::TextConditioning> {
        let mut memory = self.text_memory.borrow_mut();
        for c in captions {
            if !memory.contains_key(c) {
                let e = tch::no_grad(|| {
                    encode_batch(
                        self.tok,
                        &self.model.te1,
                        &self.model.te2,
                        std::slice::from_ref(c),
                    )
                })?;
                memory.insert(c.clone(), (e.context, e.pooled));
            }
        }
        let parts: Vec<&(Tensor, Tensor)> = captions.iter().map(|c| &memory[c]).collect();
        let len = parts.iter().fold(1, |l, (ctx, _)| {
            let n = ctx.size()[1];
            l / crate::pipeline::gcd(l, n) * n
        });
        let ctx: Vec<Tensor> = parts
            .iter()
            .map(|(c, _)| crate::pipeline::repeat_tokens(c, len))
            .collect();
        let pooled: Vec<Tensor> = parts.iter().map(|(_, p)| p.shallow_clone()).collect();
        Ok(crate::conditioning::TextConditioning {
            context: Tensor::cat(&ctx, 0),
            pooled: Tensor::cat(&pooled, 0),
        })
    }

    /// Loads a planned batch's pixels as a `[B, 3, H, W]` tensor.
    fn pixels(&self, planned: &PlannedBatch) -> Result<Tensor> {
        let ready = {
            let mut slot = self.prefetched.borrow_mut();
            match slot.take() {
                Some((p, h)) if &p == planned => h.join().ok(),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        let lb = ready.unwrap_or_else(|| {
            load_batch(
                &self.data.images,
                planned,
                0,
                &DecodeLimits::default(),
                [255, 255, 255],
            )
        });
        if !lb.skipped.is_empty() || lb.items.is_empty() {
            return Err(terr(format!(
                "could not read {}: the dataset changed during training",
                lb.skipped.join(", ")
            )));
        }
        let (w, h) = planned.bucket;
        Ok(Tensor::from_slice(&lb.pixels)
            .view([lb.items.len() as i64, 3, h as i64, w as i64])
            .to_device(self.model.unet_device()))
    }

    /// Loss of one micro-batch (not yet divided by the accumulation).
    fn micro_step(
        &self,
        planned: &PlannedBatch,
        samples: &[Sample],
        micro_id: u64,
    ) -> Result<Tensor> {
        let t = &self.job.train;
        let seed = self.job.job.seed;
        let mut rng = derived_rng(seed, &[3, micro_id]);
        let captions: Vec<String> = planned
            .items
            .iter()
            .zip(samples)
            .map(|(_, s)| {
                self.data.captions[s.dataset].process(&self.data.images[s.image].caption, &mut rng)
            })
            .collect();
        let x0 = self.latents(planned, rng.gen())?;
        let b = x0.size()[0];
        let step_seed: i64 = rng.gen::<i64>() & i64::MAX;
        tch::manual_seed(step_seed);
        let device = x0.device();
        let ts = Tensor::randint_low(
            t.min_timestep as i64,
            t.max_timestep as i64,
            [b],
            (Kind::Int64, device),
        );
        let mut noise = x0.randn_like();
        if t.noise_offset > 0.0 {
            noise += Tensor::randn([b, x0.size()[1], 1, 1], (Kind::Float, device)) * t.noise_offset;
        }
        let noisy = self.tables.add_noise(&x0, &noise, &ts);
        let target = if self.v_pred {
            self.tables.v_target(&x0, &noise, &ts)
        } else {
            noise
        };
        let (context, y) = self.conditioning(planned, samples, captions)?;
        let pred = self
            .model
            .unet
            .forward(&noisy, &ts.to_kind(Kind::Float), &context, &y);
        let huber = (t.loss == "huber").then_some((self.tables, &ts));
        let mut per = per_sample_loss(&pred, &target, huber);
        if let Some(g) = t.min_snr_gamma {
            per = &per * self.tables.min_snr_weights(&ts, g, self.v_pred);
        }
        Ok(per.mean(Kind::Float))
    }

    /// Mean loss over the fixed validation set with fixed noise and timesteps.
    fn validation_loss(&self, items: &[(PlannedBatch, Vec<Sample>)], seed: u64) -> Result<f64> {
        const TIMESTEPS: [i64; 5] = [100, 300, 500, 700, 900];
        let device = self.model.unet_device();
        // summed on the device; one host read per validation
        let mut total = Tensor::zeros([], (Kind::Float, device));
        for (i, (planned, samples)) in items.iter().enumerate() {
            let caption = {
                let s = &samples[0];
                let p = CaptionProcessing {
                    trigger: self.job.job.trigger_word.clone(),
                    ..Default::default()
                };
                p.process(
                    &self.data.images[s.image].caption,
                    &mut derived_rng(seed, &[4, i as u64]),
                )
            };
            tch::no_grad(|| -> Result<()> {
                let x0 = self.latents(planned, seed ^ (i as u64 * 7919))?;
                let (context, y) = self.conditioning(planned, samples, vec![caption])?;
                // stratified timesteps, fixed noise
                for (k, tv) in TIMESTEPS.iter().enumerate() {
                    tch::manual_seed((seed as i64 & 0xffff_ffff) + (i as i64) * 16 + k as i64);
                    let noise = x0.randn_like();
                    let ts = Tensor::from_slice(&[*tv]).to_device(device);
                    let noisy = self.tables.add_noise(&x0, &noise, &ts);
                    let target = if self.v_pred {
                        self.tables.v_target(&x0, &noise, &ts)
                    } else {
                        noise
                    };
                    let pred =
                        self.model
                            .unet
                            .forward(&noisy, &ts.to_kind(Kind::Float), &context, &y);
                    total += per_sample_loss(&pred, &target, None).mean(Kind::Float);
                }
                Ok(())
            })?;
        }
        let n = (items.len().max(1) * TIMESTEPS.len()) as f64;
        Ok(total.double_value(&[]) / n)
    }
}

fn append_csv(
    path: &Path,
    step: u64,
    loss: Option<f64>,
    lr: Option<f64>,
    val: Option<f64>,
    secs: f64,
) -> Result<()> {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.6e}")).unwrap_or_default();
    let line = format!("{step},{},{},{},{secs:.2}\n", f(loss), f(lr), f(val));
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| SdxlError::io(path, e))?;
    file.write_all(line.as_bytes())
        .map_err(|e| SdxlError::io(path, e))
}

/// Draws `loss.png` from `loss.csv`: the training loss (mean per log line)
/// and the fixed-seed validation loss by step.
pub fn write_loss_chart(csv: &Path, png: &Path, title: &str) -> Result<()> {
    use lora_data::render::{line_chart, save_png, Series};
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
    save_png(png, &img, &[("software", &crate::compare::software())])
        .map_err(|e| terr(e.to_string()))
}

fn lora_set(leaves: &[Leaf]) -> Result<LoraSet> {
    let mut set = LoraSet::new();
    for l in leaves {
        set.insert(
            l.key.clone(),
            LoraAdapter::from_weights(l.down.detach(), l.up.detach(), Some(l.alpha))?,
        );
    }
    Ok(set)
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    job: &JobConfig,
    run_dir: &Path,
    leaves: &[Leaf],
    step: u64,
    epoch: u64,
    data: &Data,
    model: &SdxlModel,
    t0: Instant,
    final_save: bool,
) -> Result<PathBuf> {
    let name = &job.job.name;
    let mut tags: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (d, ds) in job.datasets.iter().enumerate() {
        let mut st = TagStats::default();
        for (img, _) in data
            .images
            .iter()
            .zip(&data.dataset_of)
            .filter(|(_, &x)| x == d)
        {
            st.add(&img.caption);
        }
        let folder = ds
            .folder_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        tags.insert(
            format!("{}_{folder}", ds.num_repeats),
            st.counts.into_iter().map(|(k, v)| (k, v as u64)).collect(),
        );
    }
    let res = job.datasets[0]
        .resolution
        .iter()
        .copied()
        .max()
        .unwrap_or(1024);
    let now = lora_core::metadata::now_unix();
    let n = &job.network;
    let md = TrainingMetadata {
        output_name: name.clone(),
        network_dim: n.linear,
        network_alpha: n.linear_alpha,
        conv_dim: (n.conv > 0).then_some(n.conv),
        conv_alpha: (n.conv > 0).then_some(n.conv_alpha),
        network_dropout: (n.dropout > 0.0).then_some(n.dropout),
        rank_dropout: (n.rank_dropout > 0.0).then_some(n.rank_dropout),
        module_dropout: (n.module_dropout > 0.0).then_some(n.module_dropout),
        steps: step,
        epoch,
        max_train_steps: Some(job.train.steps),
        learning_rate: job.train.lr,
        text_encoder_lr: job
            .train
            .train_text_encoder
            .then_some(job.train.text_encoder_lr.unwrap_or(job.train.lr)),
        resolution: (res, res),
        tag_frequency: tags,
        bucket_info: None,
        seed: job.job.seed,
        training_started_at: now - t0.elapsed().as_secs_f64(),
        training_finished_at: final_save.then_some(now),
        sd_model_name: job
            .model
            .name_or_path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned()),
        prediction: model.detected.prediction,
        trigger_phrase: job.job.trigger_word.clone(),
        title: None,
        extra: BTreeMap::from([
            (
                "ss_gradient_accumulation_steps".to_string(),
                job.train.gradient_accumulation.to_string(),
            ),
            (
                "ss_lr_scheduler".to_string(),
                job.train.lr_scheduler.clone(),
            ),
            (
                "ss_optimizer".to_string(),
                format!("lorakit.AdamW(weight_decay={})", job.train.weight_decay),
            ),
            (
                "ss_noise_offset".to_string(),
                lora_core::metadata::py_float(job.train.noise_offset),
            ),
            (
                "ss_min_snr_gamma".to_string(),
                lora_core::metadata::py_opt_float(job.train.min_snr_gamma),
            ),
            (
                "ss_num_train_images".to_string(),
                data.images.len().to_string(),
            ),
        ]),
    };
    let set = lora_set(leaves)?;
    let kind = kind_of(&job.save.dtype);
    let path = if final_save {
        run_dir.join(format!("{name}.safetensors"))
    } else {
        run_dir.join(format!("{name}_{step:09}.safetensors"))
    };
    set.save(&path, kind, &md.to_map())?;
    if !final_save {
        // keep the newest step files, chosen by the step in the name (not file times)
        let prefix = format!("{name}_");
        let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
            .map_err(|e| SdxlError::io(run_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let f = p.file_name()?.to_str()?.to_string();
                let s = f
                    .strip_prefix(&prefix)?
                    .strip_suffix(".safetensors")?
                    .parse::<u64>()
                    .ok()?;
                Some((s, p))
            })
            .collect();
        steps.sort();
        let keep = job.save.max_step_saves_to_keep as usize;
        if steps.len() > keep {
            for (_, p) in &steps[..steps.len() - keep] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(path)
}

#[allow(clippy::too_many_arguments)]
fn save_state(
    path: &Path,
    leaves: &[Leaf],
    opt_unet: &AdamW,
    opt_te: &AdamW,
    hash: &str,
    step: u64,
    epoch: u64,
    batch: usize,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for l in leaves {
        let name = l.key.kohya_name();
        tensors.push((
            format!("{name}.down"),
            l.down.detach().to_device(Device::Cpu),
        ));
        tensors.push((format!("{name}.up"), l.up.detach().to_device(Device::Cpu)));
    }
    for (tag, opt) in [("unet", opt_unet), ("te", opt_te)] {
        tensors.extend(opt.state_tensors(&format!("adam.{tag}")));
    }
    let md = BTreeMap::from([
        ("lorakit.job_hash".to_string(), hash.to_string()),
        ("lorakit.step".to_string(), step.to_string()),
        ("lorakit.epoch".to_string(), epoch.to_string()),
        ("lorakit.batch".to_string(), batch.to_string()),
        (
            "lorakit.adam.unet.steps".to_string(),
            opt_unet.steps_taken().to_string(),
        ),
        (
            "lorakit.adam.te.steps".to_string(),
            opt_te.steps_taken().to_string(),
        ),
    ]);
    let bytes = lora_core::io::serialize(&tensors, &md)?;
    lora_core::io::write_atomic(path, &bytes)?;
    Ok(())
}
