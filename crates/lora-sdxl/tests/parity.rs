//! Numerical parity with diffusers on tiny SDXL-architecture checkpoints
//! written by scripts/fixtures/tiny_sdxl.py: max |Δ| / std(reference) within
//! [`PARITY`], fp32 CPU.

use lora_core::Component;
use lora_sdxl::model::nn::Slots;
use lora_sdxl::model::unet::vector_conditioning;
use lora_sdxl::{
    Activation, Checkpoint, ClipConfig, ClipLayout, ClipTextModel, Unet, UnetConfig, Vae,
    VaeConfig, VarBuilder,
};
use lora_testkit::Tolerance;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    lora_core::io::read_tensors(fixture(&format!("{name}_io.safetensors")))
        .unwrap()
        .tensors
        .into_iter()
        .collect()
}

/// Our fp32 forward against diffusers' / transformers' fp32 one (the
/// fixture), as max |Δ| / std(reference). Measured: by default the text
/// encoders' hidden states and the VAE decoder are bit-equal to it and the
/// rest within 4.5e-6; with 1 thread the decoder is 7.9e-6 off; with MKL / oneDNN /
/// ATen held to AVX2 the decoder is 9.2e-6, the UNet 5.8e-6 and the text
/// encoders 1.9e-6 off. The fixture's own fp32 rounding, seen by running our
/// model with fp64 weights against it, is up to 1.1e-5 (the VAE decoder;
/// norms stay fp32 there): the floor. Margin 8.3, and no more: a subtle bug
/// sits just above the limit (the VAE ResBlocks' GroupNorm ε at 1e-5
/// instead of 1e-6 gives 1.3e-4 in the decoded image, 7.9e-5 in the
/// encoder's mean).
const PARITY: Tolerance = Tolerance::new(
    1.2e-5,
    8.3,
    "fp32 vs the reference's fp32: its rounding against our fp64 run, 1.1e-5",
);

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let std = want.to_kind(Kind::Double).std(true).double_value(&[]);
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    PARITY.check(format!("{what}: max |Δ| / std"), diff / std);
}

#[test]
fn unet_matches_diffusers() {
    for name in ["tiny_a", "tiny_b"] {
        let ck = Rc::new(Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap());
        let cfg = UnetConfig::infer(&ck, "model.diffusion_model.").unwrap();
        let vb = VarBuilder::new(ck.clone(), Kind::Float, Device::Cpu);
        let slots = Slots::default();
        let unet = Unet::new(&vb.pp("model.diffusion_model"), &cfg, &slots);
        vb.finish("UNet").unwrap();
        let t = io(name);
        let ctx = Tensor::cat(&[&t["te1_hidden"], &t["te2_hidden"]], -1);
        let y = vector_conditioning(&t["te2_pooled"], &t["time_ids"]);
        let eps = tch::no_grad(|| unet.forward(&t["latents"], &t["timesteps"], &ctx, &y));
        assert_close(&format!("{name} unet_eps"), &eps, &t["unet_eps"]);
        let unused: Vec<String> = ck
            .unused_keys()
            .into_iter()
            .filter(|k| k.starts_with("model.diffusion_model."))
            .collect();
        assert!(
            unused.is_empty(),
            "{name}: UNet keys never loaded: {unused:?}"
        );
    }
}

#[test]
fn text_encoders_match_transformers() {
    for name in ["tiny_a", "tiny_b"] {
        let ck = Rc::new(Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap());
        let vb = VarBuilder::new(ck.clone(), Kind::Float, Device::Cpu);
        let slots = Slots::default();
        let p1 = "conditioner.embedders.0.transformer.";
        let p2 = "conditioner.embedders.1.model.";
        let c1 = ClipConfig::infer(&ck, p1, ClipLayout::HuggingFace).unwrap();
        let c2 = ClipConfig::infer(&ck, p2, ClipLayout::OpenClip).unwrap();
        assert_eq!(c1.projection_dim, None);
        assert!(c2.projection_dim.is_some());
        let te1 = ClipTextModel::new(
            &vb.pp("conditioner.embedders.0.transformer"),
            &c1,
            ClipLayout::HuggingFace,
            Activation::QuickGelu,
            Component::Te1,
            &slots,
        );
        let te2 = ClipTextModel::new(
            &vb.pp("conditioner.embedders.1.model"),
            &c2,
            ClipLayout::OpenClip,
            Activation::Gelu,
            Component::Te2,
            &slots,
        );
        vb.finish("text encoders").unwrap();
        assert_eq!(slots.len() as i64, 6 * (c1.layers + c2.layers));
        let t = io(name);
        let o1 = tch::no_grad(|| te1.forward(&t["input_ids_1"]));
        let o2 = tch::no_grad(|| te2.forward(&t["input_ids_2"]));
        assert_close(
            &format!("{name} te1_hidden"),
            &o1.penultimate,
            &t["te1_hidden"],
        );
        assert_close(
            &format!("{name} te2_hidden"),
            &o2.penultimate,
            &t["te2_hidden"],
        );
        assert_close(&format!("{name} te2_pooled"), &o2.pooled, &t["te2_pooled"]);
    }
}

#[test]
fn vae_matches_diffusers() {
    for name in ["tiny_a", "tiny_b"] {
        let ck = Rc::new(Checkpoint::open(fixture(&format!("{name}.safetensors"))).unwrap());
        let cfg = VaeConfig::infer(&ck, "first_stage_model.").unwrap();
        let vb = VarBuilder::new(ck.clone(), Kind::Float, Device::Cpu);
        let vae = Vae::new(&vb.pp("first_stage_model"), &cfg);
        vb.finish("VAE").unwrap();
        let t = io(name);
        let (mean, _) = tch::no_grad(|| vae.encode_moments(&t["image"]));
        assert_close(&format!("{name} vae_mean"), &mean, &t["vae_mean"]);
        let dec = tch::no_grad(|| vae.decode(&t["latents"]));
        assert_close(&format!("{name} vae_decoded"), &dec, &t["vae_decoded"]);
        let unused: Vec<String> = ck
            .unused_keys()
            .into_iter()
            .filter(|k| k.starts_with("first_stage_model."))
            .collect();
        assert!(
            unused.is_empty(),
            "{name}: VAE keys never loaded: {unused:?}"
        );
    }
}

#[test]
fn reference_outputs_harness_matches_fixture() {
    let m = lora_sdxl::SdxlModel::load(fixture("tiny_b.safetensors"), Kind::Float, Device::Cpu)
        .unwrap();
    let t = io("tiny_b");
    let inputs: HashMap<String, Tensor> = [
        "input_ids_1",
        "input_ids_2",
        "latents",
        "timesteps",
        "time_ids",
        "image",
    ]
    .iter()
    .map(|k| (k.to_string(), t[*k].shallow_clone()))
    .collect();
    let out = m.reference_outputs(&inputs).unwrap();
    assert_eq!(out.len(), 6);
    for (k, v) in &out {
        assert_close(&format!("harness {k}"), v, &t[k.as_str()]);
    }
}
