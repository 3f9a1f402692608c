//! How much the toy-world quality test's scores move with the training seed
//! and the sampling seed: the calibration behind the thresholds of
//! `crates/lora-sdxl/tests/toy_world.rs` (issue 25).
//!
//! ```text
//! cargo run --release --example toy_world_spread -- --train-seeds 42,1,2,3,4,5 [--sample-seeds 1,7] [--steps 400,450,500]
//! ```
//!
//! For each training seed (`job.seed`) it trains the demo's job
//! ([`lorakit::sdxl::toy_world::character_job`], the dataset fixed) and
//! scores the chosen checkpoints with the toy-world detector: 8 samples per
//! prompt and sampling seed, at strength 0.8, the three trigger prompts and
//! the prompt without the trigger. One line per (training seed, step,
//! sampling seed), then the mean over them — the figure the quality test
//! asserts on — and the range of those means over the training seeds. Run it with `ATEN_CPU_CAPABILITY=default
//! MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2` as well to see
//! another CPU's rounding.

use lorakit::core::LoraSet;
use lorakit::sdxl::toy_world::{asset_path, character_job, Scores, TRIGGER};
use lorakit::sdxl::train::checkpoint::checkpoint_path;
use lorakit::sdxl::train::{train, TrainOptions};
use lorakit::sdxl::{ClipTokenizer, SdxlModel};

#[path = "common/mod.rs"]
mod common;
use common::arg;

/// Samples per prompt and sampling seed (the quality test's figure).
const SAMPLES: usize = 8;

fn list(args: &[String], name: &str, default: &str) -> Vec<u64> {
    arg(args, name)
        .unwrap_or_else(|| default.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("a comma-separated list of integers")
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let train_seeds = list(&args, "--train-seeds", "42,1,2,3,4");
    let sample_seeds = list(&args, "--sample-seeds", "1,7");
    let steps = list(&args, "--steps", "400,450,500");
    let model = SdxlModel::load(asset_path(), tch::Kind::Float, tch::Device::Cpu)?;
    let tok = ClipTokenizer::new();
    println!(
        "train_seed step sample_seed | trigger: body character | without: body character green"
    );
    let mut means = Vec::new();
    for &train_seed in &train_seeds {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        lorakit::data::synthetic::write_character_dataset(&data, 16, 64, 64, TRIGGER, 2026)?;
        let job_path = dir.path().join("job.toml");
        let mut job = character_job(&job_path, &asset_path(), &data, dir.path())?;
        job.job.seed = train_seed;
        job.sample.disable = true;
        job.validation.images = None;
        let report = train(&job, &job_path, &TrainOptions::default())?;
        let mut rounds = Vec::new();
        for &step in &steps {
            let last = step == job.train.steps;
            let path = checkpoint_path(&report.run_dir, &job.job.name, step, last);
            model.detach_loras();
            model.attach_lora(LoraSet::load(&path)?, job.sample.strength)?;
            for &sample_seed in &sample_seeds {
                let mut s = job.sample.clone();
                s.seed = sample_seed;
                let r = Scores::of(&model, &tok, &s, SAMPLES)?;
                println!(
                    "{train_seed:>10} {step:>4} {sample_seed:>11} | {:>13.3} {:>9.3} | {:>13.3} {:>9.3} {:>5.3}",
                    r.body, r.character, r.bleed_body, r.bleed_character, r.green_square
                );
                rounds.push(r);
            }
        }
        let m = Scores::mean(&rounds);
        println!(
            "{train_seed:>10} mean      {:>11} | {:>13.3} {:>9.3} | {:>13.3} {:>9.3} {:>5.3}",
            "", m.body, m.character, m.bleed_body, m.bleed_character, m.green_square
        );
        means.push(m);
        model.detach_loras();
    }
    let range = |f: fn(&Scores) -> f64| {
        let v: Vec<f64> = means.iter().map(f).collect();
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.3}–{hi:.3}")
    };
    println!(
        "means over training seeds {train_seeds:?}: body {}, character {}; without the trigger: body {}, character {}, green square {}",
        range(|m| m.body),
        range(|m| m.character),
        range(|m| m.bleed_body),
        range(|m| m.bleed_character),
        range(|m| m.green_square)
    );
    Ok(())
}
