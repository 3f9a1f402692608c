//! Generate images with a model and LoRAs from Rust, and compare LoRA
//! strengths in a labelled grid — what `lorakit sample` / `lorakit grid` do.
//!
//! ```text
//! cargo run --release --example compare_grid -- --model sdxl.safetensors --lora my_lora.safetensors [--out DIR]
//! cargo run --release --example compare_grid            # no arguments: a tiny random model and LoRA (CPU)
//! ```

use lorakit::core::LoraSet;
use lorakit::sdxl::sample::grid::{render_grid, Column, GridRequest, LoraUse};
use lorakit::sdxl::sample::txt2img::{txt2img, GenerateParams};
use lorakit::sdxl::{ClipTokenizer, SdxlConfig, SdxlModel, TargetScope};
use lorakit::tch::Device;
use lorakit::Kind;
use std::path::PathBuf;

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
            // A tiny SDXL-architecture model and a random LoRA for it.
            let m = out.join("tiny_sdxl.safetensors");
            let cfg = SdxlConfig::tiny();
            lorakit::sdxl::synthetic::write_random_checkpoint(&m, &cfg, 5, Kind::Float)?;
            let set = lorakit::sdxl::synthetic::random_lora(&cfg, TargetScope::UNET, 4, 4, 0.05)?;
            let l = out.join("random_lora.safetensors");
            set.save(&l, Kind::Half, &Default::default())?;
            (m, l, 256, 12)
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
        negative: "blurry, lowres".into(),
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
        prompt: "1girl, solo, beach, looking at viewer".into(),
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
        "1girl, solo, beach, looking at viewer".to_string(),
        "1girl, sitting, city at night".to_string(),
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
