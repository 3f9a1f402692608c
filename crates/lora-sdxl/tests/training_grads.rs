//! Training through the LoRA slots: gradients reach only the adapters.

use lora_core::{Dropouts, Geometry, LoraAdapter, LoraSet};
use lora_sdxl::{lora_targets, SdxlModel, TargetScope};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// A trainable adapter for `t`: kohya init for down, small random up (so
/// gradients reach both), rank dropout on; returns it and its two leaves.
fn trainable(t: &lora_sdxl::Target, rank: i64, rank_dropout: f64) -> (LoraAdapter, Tensor, Tensor) {
    let mut a = LoraAdapter::new(
        t.in_features,
        t.out_features,
        rank,
        None,
        t.geometry,
        Kind::Float,
        Device::Cpu,
    )
    .unwrap();
    let down = a.down().set_requires_grad(true);
    let up = (Tensor::randn(a.up().size().as_slice(), (Kind::Float, Device::Cpu)) * 0.01)
        .set_requires_grad(true);
    a.set_weights(down.shallow_clone(), up.shallow_clone())
        .unwrap();
    a.set_dropouts(Dropouts {
        rank_dropout,
        ..Default::default()
    })
    .unwrap();
    (a, down, up)
}

#[test]
fn gradients_flow_only_into_adapters() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_a.safetensors");
    let m = SdxlModel::load(&path, Kind::Float, Device::Cpu).unwrap();
    tch::manual_seed(0);
    let mut set = LoraSet::new();
    let mut leaves = Vec::new();
    for t in lora_targets(&m.detected.config, TargetScope::ALL) {
        let rank = if matches!(t.geometry, Geometry::Conv2d { .. }) && t.uses_conv_rank() {
            2
        } else {
            4
        };
        let (a, down, up) = trainable(&t, rank, 0.1);
        leaves.push((t.key.clone(), down, up));
        set.insert(t.key, a);
    }
    let n = set.len();
    m.attach_lora(set, 1.0).unwrap();
    m.slots.set_training(true);
    let io: std::collections::HashMap<String, Tensor> = lora_core::io::read_tensors(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_a_io.safetensors"),
    )
    .unwrap()
    .tensors
    .into_iter()
    .collect();
    let o1 = m.te1.forward(&io["input_ids_1"]);
    let o2 = m.te2.forward(&io["input_ids_2"]);
    let ctx = Tensor::cat(&[&o1.penultimate, &o2.penultimate], -1);
    let y = lora_sdxl::unet::vector_conditioning(&o2.pooled, &io["time_ids"]);
    let eps = m.unet.forward(&io["latents"], &io["timesteps"], &ctx, &y);
    let loss = (eps - &io["latents"])
        .pow_tensor_scalar(2)
        .mean(Kind::Float);
    loss.backward();
    let mut with_grad = 0;
    // SDXL reads CLIP-L's penultimate layer, so adapters on its last layer get
    // no gradient (as in kohya, which trains them anyway).
    let last_te1 = format!(
        "text_model.encoder.layers.{}.",
        m.detected.config.te1.layers - 1
    );
    let live: Vec<_> = leaves
        .iter()
        .filter(|(k, _, _)| {
            !(k.component == lora_core::Component::Te1 && k.path.starts_with(&last_te1))
        })
        .collect();
    assert_eq!(live.len(), leaves.len() - 6);
    for (key, down, up) in live.iter().map(|(k, d, u)| (k, d, u)) {
        let g = up.grad();
        assert!(g.defined(), "{key}: no gradient on lora_up");
        if g.abs().sum(Kind::Float).double_value(&[]) > 0.0 {
            with_grad += 1;
        }
        assert!(down.grad().defined(), "{key}: no gradient on lora_down");
    }
    assert_eq!(leaves.len(), n);
    assert!(
        with_grad as f64 > 0.9 * live.len() as f64,
        "{with_grad} of {} adapters got a non-zero gradient",
        live.len()
    );
    // the base model is frozen: its weights never require grad
    assert!(!m.unet.conv_out_weight().requires_grad());
    m.slots.set_training(false);
}

/// Gradient checkpointing recomputes each UNet block in backward: the same
/// loss and the same LoRA gradients (rank dropout on, so the RNG state must
/// be replayed), with activations freed during the forward.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_a.safetensors");
    let m = SdxlModel::load(&path, Kind::Float, Device::Cpu).unwrap();
    tch::manual_seed(1);
    let mut set = LoraSet::new();
    let mut leaves = Vec::new();
    for t in lora_targets(
        &m.detected.config,
        TargetScope {
            unet: true,
            unet_conv: true,
            te1: false,
            te2: false,
        },
    ) {
        let (a, down, up) = trainable(&t, 4, 0.25);
        leaves.push((down, up));
        set.insert(t.key, a);
    }
    m.attach_lora(set, 1.0).unwrap();
    m.slots.set_training(true);
    let opts = (Kind::Float, Device::Cpu);
    let cfg = &m.detected.config.unet;
    let x = Tensor::randn([2, 4, 16, 16], opts);
    let t = Tensor::from_slice(&[10f32, 700.]);
    let ctx = Tensor::randn([2, 77, cfg.context_dim], opts);
    let y = Tensor::randn([2, cfg.adm_in_channels], opts);
    let run = |ckpt: bool| {
        m.unet.set_gradient_checkpointing(ckpt);
        for (d, u) in &leaves {
            for p in [d, u] {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        }
        tch::manual_seed(42);
        let loss = m.unet.forward(&x, &t, &ctx, &y).square().mean(Kind::Float);
        loss.backward();
        let grads: Vec<Tensor> = leaves
            .iter()
            .flat_map(|(d, u)| [d.grad().copy(), u.grad().copy()])
            .collect();
        (loss.double_value(&[]), grads)
    };
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "loss {l0} vs {l1}");
    // Compare against the overall gradient scale: some adapters get
    // gradients at the 1e-10 level (pure float noise in both runs).
    let scale = g0
        .iter()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0f64, f64::max);
    let worst = g0
        .iter()
        .zip(&g1)
        .map(|(a, b)| (a - b).abs().max().double_value(&[]))
        .fold(0f64, f64::max)
        / scale;
    assert!(worst < 1e-4, "gradients differ by {worst:.2e} (relative)");
    assert!(
        g1.iter()
            .filter(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0)
            .count()
            > g1.len() / 2
    );
    m.unet.set_gradient_checkpointing(false);
    m.slots.set_training(false);
}
