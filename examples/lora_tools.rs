//! The LoRA file tools from Rust — what `lorakit lora resize`, `lorakit model
//! merge` and `lorakit lora extract` do — chained as a round trip that checks
//! itself: resize a LoRA to half its rank, bake the original into the base
//! checkpoint, extract it back from (merged − base) and compare with the
//! original's ΔW.
//!
//! ```text
//! cargo run --release --example lora_tools -- --model sdxl.safetensors --lora my_lora.safetensors [--out DIR]
//! cargo run --release --example lora_tools     # no arguments: a tiny random model and LoRA (CPU)
//! ```

use lorakit::core::resize::{fro_retained_summary, resize_set, RankRule, ResizeOptions};
use lorakit::core::{load_lora, UnknownKeys};
use lorakit::sdxl::{extract_lora, merge_into_checkpoint, ExtractOptions, SdxlConfig, TargetScope};
use lorakit::Kind;
use std::path::PathBuf;

#[path = "common/mod.rs"]
mod common;
use common::arg;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(arg(&args, "--out").unwrap_or_else(|| "output/lora_tools".into()));
    std::fs::create_dir_all(&out)?;
    let (model, lora) = match (arg(&args, "--model"), arg(&args, "--lora")) {
        (Some(m), Some(l)) => (PathBuf::from(m), PathBuf::from(l)),
        _ => {
            let m = out.join("tiny_sdxl.safetensors");
            let cfg = SdxlConfig::tiny();
            lorakit::sdxl::synthetic::write_random_checkpoint(&m, &cfg, 5, Kind::Float)?;
            let set = lorakit::sdxl::synthetic::random_lora(&cfg, TargetScope::ALL, 8, 8, 0.05)?;
            let l = out.join("random_lora.safetensors");
            set.save(&l, Kind::Float, &Default::default())?;
            (m, l)
        }
    };
    let original = load_lora(&lora, UnknownKeys::Reject)?;
    let max_rank = original
        .set
        .iter()
        .map(|(_, a)| a.rank())
        .max()
        .unwrap_or(1);

    // 1. resize to half the rank
    let opts = ResizeOptions {
        rank: (max_rank / 2).max(1),
        conv_rank: (max_rank / 2).max(1),
        rule: RankRule::Fixed,
    };
    let (small, stats) = resize_set(&original.set, &opts)?;
    let (mean, _) = fro_retained_summary(&stats);
    let small_path = out.join("resized.safetensors");
    small.save(&small_path, Kind::Half, &original.metadata)?;
    println!(
        "resize: rank {max_rank} → {} keeps {:.1}% of ‖ΔW‖ on average → {}",
        opts.rank,
        100.0 * mean,
        small_path.display()
    );

    // 2. bake the original into the checkpoint
    let merged = out.join("merged.safetensors");
    let r = merge_into_checkpoint(&model, &[(&original.set, 1.0)], &merged, Default::default())?;
    println!(
        "merge: {} modules into {} tensors → {}",
        r.modules,
        r.merged_tensors,
        merged.display()
    );

    // 3. extract it back at the original rank, without clamping
    let x = extract_lora(
        &model,
        &merged,
        &ExtractOptions {
            rank: max_rank,
            conv_rank: Some(max_rank),
            clamp_quantile: None,
            ..Default::default()
        },
        &mut |_, _| {},
    )?;
    let mut worst = 0f64;
    for (key, a) in original.set.iter() {
        let Some(b) = x.set.get(key) else {
            println!(
                "extract: {} not found (identical weights?)",
                key.kohya_name()
            );
            continue;
        };
        let (da, db) = (a.delta_weight(), b.delta_weight());
        let rel =
            (&da - &db).abs().max().double_value(&[]) / da.abs().max().double_value(&[]).max(1e-12);
        worst = worst.max(rel);
    }
    println!(
        "extract: {} modules back from (merged − base); largest ΔW difference from the original {:.1e} (relative; the checkpoint's dtype rounds it)",
        x.set.len(),
        worst
    );
    Ok(())
}
