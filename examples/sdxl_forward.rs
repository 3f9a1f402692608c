//! Parity harness and usage example: run an SDXL-family checkpoint's text
//! encoders, UNet and VAE on given inputs, optionally with LoRAs.
//!
//! ```text
//! cargo run --release --example sdxl_forward -- --checkpoint CKPT --inputs IN.safetensors \
//!     --output OUT.safetensors [--lora FILE:STRENGTH]...
//! ```
//! Inputs (any subset): `input_ids_1`, `input_ids_2` (i64 [B,77]), `latents` [B,4,h,w],
//! `timesteps` [B], `time_ids` [B,6], `image` [B,3,H,W] in [-1,1].
//! Outputs: `te1_hidden`, `te2_hidden` (penultimate), `te2_pooled`, `unet_eps`,
//! `vae_mean` (unscaled), `vae_decoded` (of `latents` as given). fp32 on CPU.

use lorakit::core::{load_lora, UnknownKeys};
use lorakit::sdxl::SdxlModel;
use lorakit::tch::{Device, Kind};
use std::collections::HashMap;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut checkpoint = None;
    let mut inputs = None;
    let mut output = None;
    let mut loras = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--checkpoint" => checkpoint = Some(val()?),
            "--inputs" => inputs = Some(val()?),
            "--output" => output = Some(val()?),
            "--lora" => loras.push(val()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let usage = "usage: sdxl_forward --checkpoint CKPT --inputs IN.safetensors --output OUT.safetensors [--lora FILE:STRENGTH]...";
    let (checkpoint, inputs, output) = match (checkpoint, inputs, output) {
        (Some(c), Some(i), Some(o)) => (c, i, o),
        _ => return Err(usage.into()),
    };
    let model = SdxlModel::load(&checkpoint, Kind::Float, Device::Cpu)?;
    for spec in &loras {
        let (file, strength) = match spec.rsplit_once(':') {
            Some((f, s)) if s.parse::<f64>().is_ok() => (f.to_string(), s.parse::<f64>()?),
            _ => (spec.clone(), 1.0),
        };
        let lora = load_lora(&file, UnknownKeys::Reject)?;
        let attached = model.attach_lora(lora.set, strength)?;
        eprintln!("attached {file} at {strength}: {:?}", attached.modules);
    }
    let inputs: HashMap<_, _> = lorakit::core::io::read_tensors(&inputs)?
        .tensors
        .into_iter()
        .collect();
    let outputs = model.reference_outputs(&inputs)?;
    let bytes = lorakit::core::io::serialize(&outputs, &Default::default())?;
    lorakit::core::io::write_atomic(&output, &bytes)?;
    for (k, t) in &outputs {
        eprintln!("{k}: {:?}", t.size());
    }
    Ok(())
}
