//! Build a LoRA for every module kohya adapts in an SDXL-architecture model,
//! save it in kohya format, load it back and merge one module.
//!
//! ```text
//! cargo run --example build_lora -- [out.safetensors] [--tiny]
//! ```

use lorakit::core::{LoraAdapter, LoraSet, TrainingMetadata};
use lorakit::sdxl::{lora_targets, SdxlConfig, TargetScope};
use lorakit::tch::{Device, Tensor};
use lorakit::Kind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tiny = args.iter().any(|a| a == "--tiny");
    let out = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "output/example_lora.safetensors".to_string());
    let cfg = if tiny {
        SdxlConfig::tiny()
    } else {
        SdxlConfig::base()
    };

    let mut set = LoraSet::new();
    for t in lora_targets(&cfg, TargetScope::UNET) {
        let adapter = LoraAdapter::new(
            t.in_features,
            t.out_features,
            8,
            Some(4.0),
            t.geometry,
            Kind::Float,
            Device::Cpu,
        )?;
        set.insert(t.key, adapter);
    }
    println!(
        "{} UNet modules, {} parameters",
        set.len(),
        set.num_parameters()
    );

    let meta = TrainingMetadata {
        output_name: "example".into(),
        network_dim: 8,
        network_alpha: 4.0,
        resolution: (1024, 1024),
        learning_rate: 1e-4,
        ..Default::default()
    };
    let saved = set.save(&out, Kind::BFloat16, &meta.to_map())?;
    println!(
        "saved {out} ({} bytes, sshs_model_hash {})",
        saved.size, saved.model_hash
    );

    let back = LoraSet::load(&out)?;
    let (key, adapter) = back.iter().next().ok_or("empty set")?;
    let w = Tensor::zeros(
        [adapter.out_features(), adapter.in_features()],
        (Kind::Float, Device::Cpu),
    );
    let merged = adapter.merged_weight(&w, 0.8)?;
    // lora_up starts at zero, so an untrained LoRA changes nothing.
    println!(
        "{key}: merged weight max |ΔW| = {}",
        merged.abs().max().double_value(&[])
    );
    Ok(())
}
