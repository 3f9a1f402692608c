//! Generate images with a model and LoRAs from Rust, and compare LoRA
//! strengths in a labelled grid — what `lorakit sample` / `lorakit grid` do.
//!
//! ```text
//! cargo run --release --example compare_grid -- --model sdxl.safetensors --lora my_lora.safetensors [--out DIR]
//! cargo run --release --example compare_grid            # no arguments: the toy-world base and a character LoRA trained on it (CPU, about a minute)
//! ```

use lorakit::core::LoraSet;
use lorakit::sdxl::sample::grid::{render_grid, Column, GridRequest, LoraUse};
use lorakit::sdxl::sample::txt2img::{txt2img, GenerateParams};
use lorakit::sdxl::{ClipTokenizer, SdxlModel};
use lorakit::tch::Device;
use lorakit::Kind;
use std::path::{Path, PathBuf};

#[path = "common/mod.rs"]
mod common;
use common::arg;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(arg(&args, "--out").unwrap_or_else(|| "output/compare_grid".into()));
    std::fs::create_dir_all(&out)?;
    let device = Device::cuda_if_available();
    let (model_path, lora_path, size, steps) = match (arg(&args, "--model"), arg(&args, "--lora")) {
        (Some(m), Some(l)) => (PathBuf::from(m), PathBuf::from(l), 1024, 25),
        _ => {
            // The toy-world base and a LoRA of the demo character, trained here.
            let model = lorakit::sdxl::toy_world::asset_path();
            (model.clone(), train_character_lora(&model, &out)?, 64, 20)
        }
    };
    let kind = if device.is_cuda() {
        Kind::Half
    } else {
        Kind::Float
    };
    let model = SdxlModel::load(&model_path, kind, device)?;
    let tok = ClipTokenizer::new();
    let base = GenerateParams {
        negative: String::new(),
        steps,
        cfg: 6.0,
        sampler: "dpmpp_2m_karras".parse()?,
        seed: 42,
        width: size,
        height: size,
        ..GenerateParams::default()
    };

    // One image with the LoRA at 0.8 (attached without touching base weights).
    model.attach_lora(LoraSet::load(&lora_path)?, 0.8)?;
    let params = GenerateParams {
        prompt: "myakumyaku-san, large, in the center, sky".into(),
        ..base.clone()
    };
    let img = txt2img(&model, &tok, &params, &mut |i| {
        eprint!("\rstep {}/{}", i + 1, steps)
    })?;
    eprintln!();
    img[0].save(out.join("single.png"))?;
    model.detach_loras();

    // Strengths 0 (base), 0.5, 1.0 × two prompts in one labelled grid.
    let columns: Vec<Column> = [0.0, 0.5, 1.0]
        .iter()
        .map(|&s| Column {
            label: format!("strength {s}"),
            loras: vec![LoraUse {
                path: lora_path.clone(),
                strength: s,
            }],
        })
        .collect();
    let prompts = vec![
        "myakumyaku-san, large, in the center, beach".to_string(),
        "myakumyaku-san, small, on the right, night".to_string(),
    ];
    let grid = render_grid(
        &model,
        &tok,
        GridRequest {
            model_name: "example",
            prompts: &prompts,
            columns: &columns,
            base: &base,
            out_dir: &out,
        },
        &mut |done, total| eprint!("\r{done}/{total} sampler steps"),
    )?;
    eprintln!();
    println!(
        "wrote {} and {}",
        out.join("single.png").display(),
        grid.grid.display()
    );
    Ok(())
}

/// Trains the demo's character LoRA (150 steps) on the toy base into `out`.
fn train_character_lora(model: &Path, out: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    use lorakit::sdxl::toy_world::{character_job, TRIGGER};
    let data = out.join("dataset");
    lorakit::data::synthetic::write_character_dataset(&data, 16, 64, 64, TRIGGER, 2026)?;
    let job_path = out.join("job.toml");
    let mut job = character_job(&job_path, model, &data, out)?;
    job.train.steps = 150;
    job.save.save_every = 150;
    job.sample.disable = true;
    eprintln!(
        "training a character LoRA on the toy-world base ({} steps)…",
        job.train.steps
    );
    let report = lorakit::sdxl::train(&job, &job_path, &Default::default())?;
    Ok(report.last_lora.ok_or("the run saved no LoRA")?)
}
