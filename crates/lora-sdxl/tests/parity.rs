//! Numerical parity with diffusers on tiny SDXL-architecture checkpoints
//! written by scripts/fixtures/tiny_sdxl.py: max |Δ| ≤ 1e-4 × std(reference), fp32 CPU.

use lora_sdxl::nn::Slots;
use lora_sdxl::unet::vector_conditioning;
use lora_sdxl::{Checkpoint, Unet, UnetConfig, VarBuilder};
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

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    let std = want.to_kind(Kind::Double).std(true).double_value(&[]);
    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    println!(
        "{what}: max |Δ| = {diff:.3e}, std(ref) = {std:.3e}, ratio {:.2e}",
        diff / std
    );
    assert!(
        diff <= 1e-4 * std,
        "{what}: max |Δ| {diff:e} > 1e-4 × std {std:e}"
    );
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
