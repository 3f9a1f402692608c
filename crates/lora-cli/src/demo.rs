//! `lorakit demo`: the main job on an embedded default, with no downloads.
//!
//! Writes into the output folder the toy-world base model (embedded in the
//! binary: a tiny SDXL-architecture checkpoint trained on a procedural
//! world of shapes and backgrounds, see `lora_sdxl::toy_world`), a dataset
//! of a character it has never seen (a round orange body with a blue hat,
//! trigger `myakumyaku-san`, captions naming only what is not the
//! character) and the job file; trains a LoRA on CPU with checkpoints, a
//! fixed-seed validation loss, the loss chart and a prompts × steps grid at
//! strength 0.8 (the trigger on backgrounds not in the dataset, and one
//! prompt without it); then scores every checkpoint with the toy-world
//! detector over several seeds and prints whether the character appears
//! with the trigger and not without it.

use crate::AnyResult;
use lora_core::{load_lora, LoraSet, LoraSummary, UnknownKeys};
use lora_sdxl::toy_world::{character_job, Scores, TRIGGER};
use lora_sdxl::train::checkpoint::checkpoint_path;
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::{ClipTokenizer, JobConfig, SdxlModel};
use std::path::Path;
use std::time::Instant;

/// The toy-world base (`make toy-world` rebuilds it).
const TOY_WORLD: &[u8] = include_bytes!("../../lora-sdxl/assets/toy_world.safetensors");

/// Seeds per prompt when scoring a checkpoint.
const SEEDS: usize = 8;

pub fn run(out: &Path) -> AnyResult {
    let t0 = Instant::now();
    std::fs::create_dir_all(out)?;
    // job.toml's paths are read relative to job.toml itself: write them
    // absolute, so `lorakit train OUT/job.toml --resume` works from anywhere
    let out = &std::fs::canonicalize(out)?;
    let data = out.join("dataset");
    println!("[1/5] character dataset → {}", data.display());
    lora_data::synthetic::write_character_dataset(&data, 16, 64, 64, TRIGGER, 2026)?;
    let model = out.join("toy_world.safetensors");
    println!(
        "[2/5] toy-world base model (tiny SDXL architecture, trained on shapes and backgrounds; it has never seen the character) → {}",
        model.display()
    );
    lora_core::io::write_atomic(&model, TOY_WORLD)?;

    let job_path = out.join("job.toml");
    let job = character_job(&job_path, &model, &data, out)?;
    let (steps, every) = (job.train.steps, job.save.save_every);
    lora_core::io::write_atomic(&job_path, toml::to_string(&job)?.as_bytes())?;
    println!(
        "[3/5] training with {} ({steps} steps, batch 2 × accumulation 2, 64 px, CPU)",
        job_path.display()
    );
    let t_train = Instant::now();
    let report = train(&job, &job_path, &TrainOptions::default())?;
    let train_s = t_train.elapsed().as_secs_f64();

    println!("[4/5] validation loss");
    let val_losses = &report.val_losses;
    let curve: Vec<String> = val_losses
        .iter()
        .map(|(s, l)| format!("{s}: {l:.4}"))
        .collect();
    println!("      by step: {}", curve.join(", "));
    if let (Some(first), Some(last)) = (val_losses.first(), val_losses.last()) {
        println!(
            "      falls by {:.1}% from step {} to step {}",
            100.0 * (first.1 - last.1) / first.1,
            first.0,
            last.0
        );
    }
    let final_lora = report.run_dir.join("demo.safetensors");
    print!(
        "{}",
        LoraSummary::new(&load_lora(&final_lora, UnknownKeys::Reject)?)
    );

    println!("[5/5] does the character appear? (toy-world detector, {SEEDS} seeds per prompt, strength 0.8)");
    let table = score_checkpoints(&job, &model, &report.run_dir, steps, every)?;
    print!("{table}");
    lora_core::io::write_atomic(report.run_dir.join("scores.txt"), table.as_bytes())?;
    println!(
        "\ndone in {:.0} s ({train_s:.0} s training). Everything is in {}:\n  dataset/               the character images and captions\n  toy_world.safetensors  the base model\n  job.toml               the job (run it again: lorakit train {} --resume after raising train.steps)\n  demo/                  checkpoints demo_<step>.safetensors, final demo.safetensors, loss.csv, loss.png, scores.txt, state.safetensors\n  demo/samples/grid.png  prompts × steps at a fixed seed (compare more seeds: lorakit grid --model {} --loras demo/demo_*.safetensors --width 64 --height 64 --steps 20 --cfg 5 --strength 0.8 --with-base --prompt …)",
        t0.elapsed().as_secs_f64(),
        out.display(),
        job_path.display(),
        model.display()
    );
    Ok(())
}

/// Scores the base (step 0) and every checkpoint: the share of samples with
/// the character, for the trigger prompts and for the prompt without it.
fn score_checkpoints(
    job: &JobConfig,
    model_path: &Path,
    run_dir: &Path,
    steps: u64,
    every: u64,
) -> AnyResult<String> {
    let model = SdxlModel::load(model_path, tch::Kind::Float, tch::Device::Cpu)?;
    let tok = ClipTokenizer::new();
    let mut table = format!(
        "      {:>5}  {:>28}  {:>36}\n",
        "step", "with trigger: body / character", "without: body / character / green square"
    );
    for step in (0..=steps).step_by(every as usize) {
        model.detach_loras();
        if step > 0 {
            let path = checkpoint_path(run_dir, &job.job.name, step, step == steps);
            model.attach_lora(LoraSet::load(&path)?, job.sample.strength)?;
        }
        let r = Scores::of(&model, &tok, &job.sample, SEEDS)?;
        table += &format!(
            "      {step:>5}  {:>18.0}% / {:>6.0}%  {:>16.0}% / {:>6.0}% / {:>6.0}%\n",
            100.0 * r.body,
            100.0 * r.character,
            100.0 * r.bleed_body,
            100.0 * r.bleed_character,
            100.0 * r.green_square
        );
    }
    model.detach_loras();
    Ok(table)
}
