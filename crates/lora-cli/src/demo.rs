//! `lorakit demo`: the largest end-to-end slice that runs with no downloads.
//!
//! Until the trainer lands it builds a full-size SDXL LoCon LoRA (every module
//! kohya adapts, with `lorakit init`'s ranks: linear 16, conv 8) with random
//! "trained-looking" weights, proves on real SDXL weight shapes that merging
//! equals the adapted forward pass, saves it in kohya format (fp16, full
//! metadata, atomic), reads it back and prints the inspection.

use crate::AnyResult;
use lora_core::{
    load_lora, LoraAdapter, LoraSet, LoraSummary, Prediction, TrainingMetadata, UnknownKeys,
};
use lora_sdxl::{lora_targets, SdxlConfig, TargetScope};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const LINEAR_RANK: i64 = 16;
const CONV_RANK: i64 = 8;

pub fn run(out: &Path) -> AnyResult {
    let t0 = Instant::now();
    tch::manual_seed(20261128);
    let cfg = SdxlConfig::base();
    let targets = lora_targets(&cfg, TargetScope::ALL);
    println!(
        "[1/4] building a LoCon LoRA for SDXL base: {} modules (linear rank {LINEAR_RANK}, conv rank {CONV_RANK})",
        targets.len()
    );
    let mut set = LoraSet::new();
    for t in &targets {
        let rank = if t.uses_conv_rank() {
            CONV_RANK
        } else {
            LINEAR_RANK
        };
        let mut a = LoraAdapter::new(
            t.in_features,
            t.out_features,
            rank,
            Some(rank as f64),
            t.geometry,
            Kind::Float,
            Device::Cpu,
        )?;
        // A fresh adapter has lora_up = 0 (no effect); give it small random
        // weights so the file looks like a trained one.
        let up = Tensor::randn(a.up().size().as_slice(), (Kind::Float, Device::Cpu)) * 0.01;
        a.set_weights(a.down().shallow_clone(), up)?;
        set.insert(t.key.clone(), a);
    }
    println!("      {} parameters", set.num_parameters());

    println!("[2/4] checking merge == adapted forward on real SDXL shapes");
    for name in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    ] {
        let (key, _) =
            lora_core::ModuleKey::from_kohya_name(name).ok_or("demo: bad module name")?;
        let t = targets
            .iter()
            .find(|t| t.key == key)
            .ok_or("demo: module not targeted")?;
        let a = set.get(&key).ok_or("demo: module missing")?;
        let w = Tensor::randn(t.weight_shape().as_slice(), (Kind::Float, Device::Cpu)) * 0.02;
        let (x, base, merged_out) = match t.geometry {
            lora_core::Geometry::Linear => {
                let x = Tensor::randn([1, 8, t.in_features], (Kind::Float, Device::Cpu));
                let base = x.linear::<&Tensor>(&w, None);
                let merged = x.linear::<&Tensor>(&a.merged_weight(&w, 0.8)?, None);
                (x, base, merged)
            }
            lora_core::Geometry::Conv2d {
                stride,
                padding,
                dilation,
                ..
            } => {
                let x = Tensor::randn([1, t.in_features, 16, 16], (Kind::Float, Device::Cpu));
                let conv = |w: &Tensor| x.conv2d::<&Tensor>(w, None, stride, padding, dilation, 1);
                let base = conv(&w);
                let merged = conv(&a.merged_weight(&w, 0.8)?);
                (x.shallow_clone(), base, merged)
            }
        };
        let mut a2 = LoraAdapter::from_weights(
            a.down().shallow_clone(),
            a.up().shallow_clone(),
            Some(a.alpha()),
        )?;
        if let lora_core::Geometry::Conv2d {
            stride,
            padding,
            dilation,
            ..
        } = t.geometry
        {
            a2.set_conv_params(stride, padding, dilation)?;
        }
        a2.set_multiplier(0.8);
        let adapted = a2.forward(&x, &base, false);
        let diff = (&adapted - &merged_out).abs().max().double_value(&[]);
        let effect = (&adapted - &base).abs().max().double_value(&[]);
        println!("      {name}: |merged − adapted| = {diff:.2e} (LoRA effect {effect:.2e})");
        if diff > 1e-3 * effect {
            return Err(format!("merge check failed for {name}: {diff}").into());
        }
    }

    std::fs::create_dir_all(out)?;
    let path = out.join("demo_lora.safetensors");
    let meta = TrainingMetadata {
        output_name: "demo_lora".into(),
        network_dim: LINEAR_RANK,
        network_alpha: LINEAR_RANK as f64,
        conv_dim: Some(CONV_RANK),
        conv_alpha: Some(CONV_RANK as f64),
        resolution: (768, 768),
        learning_rate: 7e-5,
        seed: 20261128,
        prediction: Prediction::Epsilon,
        trigger_phrase: Some("myakumyaku-san".into()),
        tag_frequency: BTreeMap::from([(
            "1_myakumyaku-san".to_string(),
            BTreeMap::from([("myakumyaku-san".to_string(), 1u64)]),
        )]),
        training_started_at: lora_core::metadata::now_unix(),
        extra: BTreeMap::from([(
            "ss_training_comment".to_string(),
            "lorakit demo: random weights, not trained".to_string(),
        )]),
        ..Default::default()
    };
    println!(
        "[3/4] saving (fp16, kohya names, ss_*/modelspec metadata, atomic) → {}",
        path.display()
    );
    let saved = set.save(&path, Kind::Half, &meta.to_map())?;
    println!(
        "      {} bytes, sshs_model_hash {}",
        saved.size, saved.model_hash
    );

    println!("[4/4] reading it back:");
    let loaded = load_lora(&path, UnknownKeys::Reject)?;
    if loaded.set.len() != set.len() {
        return Err("demo: module count changed after the round trip".into());
    }
    print!("{}", LoraSummary::new(&loaded));
    println!(
        "\ndone in {:.1}s. The file loads in ComfyUI / A1111 / Forge / diffusers as an SDXL LoRA \
         (it is random, so it changes images without teaching anything).\nInspect it again with: lorakit lora inspect {}",
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}
