//! `lorakit demo`: the main job on an embedded default, with no downloads.
//!
//! Writes into the output folder a synthetic dataset (a round orange
//! "character" with a blue hat in varied poses and backgrounds, tag captions
//! with the trigger `myakumyaku-san`), a tiny SDXL-architecture base model in
//! the real single-file layout (random weights), and the job file it uses;
//! trains a LoRA on CPU, saving checkpoints, a fixed-seed validation loss,
//! the loss chart and a step-comparison grid of samples; and prints where
//! everything is. The base model is random, so the LoRA
//! learns this dataset's noise-prediction task, not a picture-making skill.

use crate::AnyResult;
use lora_core::{load_lora, LoraSummary, UnknownKeys};
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::{JobConfig, SdxlConfig};
use std::path::Path;
use std::time::Instant;

pub const TRIGGER: &str = "myakumyaku-san";

pub fn run(out: &Path) -> AnyResult {
    let t0 = Instant::now();
    std::fs::create_dir_all(out)?;
    let data = out.join("dataset");
    println!("[1/4] synthetic dataset → {}", data.display());
    lora_data::synthetic::write_character_dataset(&data, 12, 256, 256, TRIGGER, 2026)?;
    let model = out.join("tiny_sdxl.safetensors");
    println!(
        "[2/4] tiny SDXL-architecture model (random weights, real single-file layout) → {}",
        model.display()
    );
    lora_sdxl::synthetic::write_random_checkpoint(
        &model,
        &SdxlConfig::tiny(),
        1128,
        tch::Kind::Half,
    )?;

    let job_path = out.join("job.toml");
    let mut job = JobConfig::parse(
        &job_path,
        &JobConfig::template(model.to_str(), data.to_str(), Some(TRIGGER)),
    )?;
    job.job.name = "demo".into();
    job.job.output_dir = out.to_path_buf();
    job.job.device = Some("cpu".into());
    job.network.linear = 8;
    job.network.linear_alpha = 8.0;
    job.network.conv = 4;
    job.network.conv_alpha = 4.0;
    job.save.save_every = 10;
    job.train.steps = 40;
    job.train.lr = 2e-3;
    job.train.dtype = "fp32".into();
    // A tiny model on CPU has memory to spare: no recomputation.
    job.train.gradient_checkpointing = false.into();
    job.datasets[0].resolution = vec![256];
    job.validation.images = Some(4);
    // Samples at step 0 and every save: prompts outside the training set
    // (other backgrounds and poses), fixed seed, as users check checkpoints.
    job.sample.disable = false;
    job.sample.sample_every = 10;
    job.sample.prompts = vec![
        "[trigger], solo, full body, beach".into(),
        "[trigger], solo, looking at viewer, city at night".into(),
    ];
    job.sample.negative_prompt = "blurry".into();
    job.sample.sampler = "dpmpp_2m_karras".into();
    job.sample.sample_steps = 10;
    job.sample.guidance_scale = 5.0;
    job.sample.width = 256;
    job.sample.height = 256;
    job.sample.strength = 1.0;
    lora_core::io::write_atomic(&job_path, toml::to_string(&job)?.as_bytes())?;
    println!(
        "[3/4] training with {} (40 steps, batch 2 × accumulation 2, CPU)",
        job_path.display()
    );
    let report = train(&job, &job_path, &TrainOptions::default())?;

    println!("[4/4] result");
    let v = &report.val_losses;
    let curve: Vec<String> = v.iter().map(|(s, l)| format!("{s}: {l:.4}")).collect();
    println!("      validation loss by step: {}", curve.join(", "));
    if let (Some(first), Some(last)) = (v.first(), v.last()) {
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
    println!(
        "\ndone in {:.0} s. Everything is in {}:\n  dataset/            the synthetic images and captions\n  tiny_sdxl.safetensors  the base model\n  job.toml            the job (run it again: lorakit train {} --resume after raising train.steps)\n  demo/               checkpoints demo_<step>.safetensors, final demo.safetensors, loss.csv, loss.png, state.safetensors\n  demo/samples/grid.png  the step-comparison grid (prompts × steps; the base model is random, so images are noise)",
        t0.elapsed().as_secs_f64(),
        out.display(),
        job_path.display()
    );
    Ok(())
}
