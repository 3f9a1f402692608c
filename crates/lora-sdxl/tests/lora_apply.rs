//! Applying a kohya LoRA (Linear, 1x1 conv, strided 3x3 conv, te1, te2) at a
//! strength equals diffusers' `load_lora_weights` + `set_adapters`.

use lora_core::{load_lora, UnknownKeys};
use lora_sdxl::model::unet::vector_conditioning;
use lora_sdxl::SdxlModel;
use lora_testkit::Tolerance;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    lora_core::io::read_tensors(fixture(name))
        .unwrap()
        .tensors
        .into_iter()
        .collect()
}

/// Our fp32 forward with the LoRA against diffusers' fp32 one (the
/// fixture), as max |Δ| / std(reference). Measured: up to 4.7e-6 (the UNet
/// with MKL / oneDNN / ATen held to AVX2; 3.9e-6 by default and with 1
/// thread; text encoders 1.7e-6 at most). Running our model with fp64
/// weights puts the fixture's own fp32 rounding at 3.2e-6. Margin 21.
const PARITY: Tolerance = Tolerance::new(
    4.7e-6,
    21.0,
    "fp32 vs diffusers' fp32 with the LoRA: 4.7e-6 measured (AVX2-limited)",
);

fn check(what: &str, got: &Tensor, want: &Tensor) {
    let std = want.std(true).double_value(&[]);
    let diff = (got - want).abs().max().double_value(&[]);
    PARITY.check(format!("{what}: max |Δ| / std"), diff / std);
}

fn run(m: &SdxlModel, io: &HashMap<String, Tensor>) -> (Tensor, Tensor, Tensor, Tensor) {
    tch::no_grad(|| {
        let o1 = m.te1.forward(&io["input_ids_1"]);
        let o2 = m.te2.forward(&io["input_ids_2"]);
        let ctx = Tensor::cat(&[&o1.penultimate, &o2.penultimate], -1);
        let y = vector_conditioning(&o2.pooled, &io["time_ids"]);
        let eps = m.unet.forward(&io["latents"], &io["timesteps"], &ctx, &y);
        (o1.penultimate, o2.penultimate, o2.pooled, eps)
    })
}

#[test]
fn kohya_lora_matches_diffusers() {
    let m = SdxlModel::load(fixture("tiny_a.safetensors"), Kind::Float, Device::Cpu).unwrap();
    let io = tensors("tiny_a_io.safetensors");
    let want = tensors("tiny_a_lora_io.safetensors");
    let strength = want["strength"].double_value(&[]);
    let lora = load_lora(fixture("tiny_a_lora.safetensors"), UnknownKeys::Reject).unwrap();
    let attached = m.attach_lora(lora.set, strength).unwrap();
    assert_eq!(attached.modules.iter().map(|(_, n)| n).sum::<usize>(), 16);
    let (h1, h2, pooled, eps) = run(&m, &io);
    check("te1_hidden", &h1, &want["te1_hidden"]);
    check("te2_hidden", &h2, &want["te2_hidden"]);
    check("te2_pooled", &pooled, &want["te2_pooled"]);
    check("unet_eps", &eps, &want["unet_eps"]);

    // detached again: back to the base model's outputs
    m.detach_loras();
    let (_, _, _, eps0) = run(&m, &io);
    check("unet_eps without LoRA", &eps0, &io["unet_eps"]);
    // strength 0 equals no LoRA, bit for bit: each layer adds 0 × its
    // (finite) LoRA branch to the same base output
    let lora = load_lora(fixture("tiny_a_lora.safetensors"), UnknownKeys::Reject).unwrap();
    m.attach_lora(lora.set, 0.0).unwrap();
    let (_, _, _, eps_zero) = run(&m, &io);
    assert!(eps_zero.equal(&eps0), "strength 0 differs from no LoRA");
    m.detach_loras();
}

#[test]
fn a_lora_for_another_model_is_rejected_by_name() {
    let m = SdxlModel::load(fixture("tiny_b.safetensors"), Kind::Float, Device::Cpu).unwrap();
    let lora = load_lora(fixture("tiny_a_lora.safetensors"), UnknownKeys::Reject).unwrap();
    let e = m.attach_lora(lora.set, 1.0).unwrap_err().to_string();
    assert!(
        e.contains("does not fit this model") && e.contains("lora_"),
        "{e}"
    );
    // nothing was attached: the same output as a freshly loaded model, bit
    // for bit (the same operations on the same weights and inputs)
    let io = tensors("tiny_b_io.safetensors");
    let (_, _, _, eps) = run(&m, &io);
    let fresh = SdxlModel::load(fixture("tiny_b.safetensors"), Kind::Float, Device::Cpu).unwrap();
    let (_, _, _, want) = run(&fresh, &io);
    assert!(eps.equal(&want), "a refused LoRA changed the model");
}
