//! Training through the LoRA slots: gradients reach only the adapters.

use lora_core::{Dropouts, Geometry, LoraAdapter, LoraSet};
use lora_sdxl::{lora_targets, SdxlModel, TargetScope};
use lora_testkit::Tolerance;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// The loss with and without checkpointing, relative: 0 measured (2 threads,
/// 1 thread, MKL/oneDNN/ATen held to AVX2), as the checkpointed forward runs
/// the same kernels; floor one fp32 ulp in case a kernel is chosen by grad
/// mode. Margin 8.
const LOSS: Tolerance = Tolerance::new(f32::EPSILON as f64, 8.0, "one fp32 ulp (0 measured)");

/// LoRA gradients with and without checkpointing, relative to the largest:
/// the backward sums in another order, 1.6e-6 measured (text encoder 1, one
/// thread; 5.2e-7 with 2, 6.4e-7 AVX2-limited). Margin 60; masks that are
/// not replayed change the gradients by O(1).
const GRADS: Tolerance = Tolerance::new(1.6e-6, 60.0, "summation order in backward");

/// The tests draw dropout masks from torch's process-wide generator and
/// compare seeded runs: one at a time (parallel tests would draw in between).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let down = a.down().unwrap().set_requires_grad(true);
    let up = (Tensor::randn(
        a.up().unwrap().size().as_slice(),
        (Kind::Float, Device::Cpu),
    ) * 0.01)
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

fn tiny_a() -> SdxlModel {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_a.safetensors");
    SdxlModel::load(&path, Kind::Float, Device::Cpu).unwrap()
}

/// The fixture's token ids, time ids and latents.
fn tiny_a_io() -> std::collections::HashMap<String, Tensor> {
    lora_core::io::read_tensors(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_a_io.safetensors"),
    )
    .unwrap()
    .tensors
    .into_iter()
    .collect()
}

/// Both text encoders and the UNet, with gradients: the mean squared
/// difference between the prediction and the latents.
fn full_forward_loss(m: &SdxlModel, io: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let o1 = m.te1.forward(&io["input_ids_1"]);
    let o2 = m.te2.forward(&io["input_ids_2"]);
    let ctx = Tensor::cat(&[&o1.penultimate, &o2.penultimate], -1);
    let y = lora_sdxl::model::unet::vector_conditioning(&o2.pooled, &io["time_ids"]);
    let eps = m.unet.forward(&io["latents"], &io["timesteps"], &ctx, &y);
    (eps - &io["latents"])
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
}

#[test]
fn gradients_flow_only_into_adapters() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = tiny_a();
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
    let loss = full_forward_loss(&m, &tiny_a_io());
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

/// Gradient checkpointing recomputes each UNet block and each text-encoder
/// layer in backward: the same loss and the same LoRA gradients (rank
/// dropout on, so the RNG state must be replayed), with activations freed
/// during the forward.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = tiny_a();
    tch::manual_seed(1);
    let mut set = LoraSet::new();
    let mut leaves = Vec::new();
    for t in lora_targets(&m.detected.config, TargetScope::ALL) {
        let (mut a, down, up) = trainable(&t, 4, 0.25);
        // module dropout too: its draw must be replayed in the recomputation
        a.set_dropouts(Dropouts {
            rank_dropout: 0.25,
            module_dropout: 0.3,
            ..Default::default()
        })
        .unwrap();
        leaves.push((t.key.component, down, up));
        set.insert(t.key, a);
    }
    m.attach_lora(set, 1.0).unwrap();
    m.slots.set_training(true);
    let io = tiny_a_io();
    // rank dropout is live: two training forwards with other seeds differ,
    // so the equality below needs the masks replayed in the recomputation
    let loss_at = |seed: i64| {
        tch::manual_seed(seed);
        tch::no_grad(|| full_forward_loss(&m, &io).double_value(&[]))
    };
    let (a, b) = (loss_at(5), loss_at(6));
    // effect: the dropout masks change the loss (by far more than rounding)
    assert!(
        (a - b).abs() > 1e-7 * a.abs(),
        "dropout is not active: {a} == {b}"
    );
    let run = |ckpt: bool| {
        m.set_gradient_checkpointing(ckpt);
        assert_eq!(m.unet.gradient_checkpointing(), ckpt);
        assert_eq!(m.te1.gradient_checkpointing(), ckpt);
        assert_eq!(m.te2.gradient_checkpointing(), ckpt);
        for (_, d, u) in &leaves {
            for p in [d, u] {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
        }
        tch::manual_seed(42);
        let loss = full_forward_loss(&m, &io);
        loss.backward();
        // CLIP-L's last layer feeds nothing SDXL reads: no gradient there.
        let grad = |p: &Tensor| {
            let g = p.grad();
            if g.defined() {
                g.copy()
            } else {
                p.zeros_like()
            }
        };
        let grads: Vec<(lora_core::Component, Tensor)> = leaves
            .iter()
            .flat_map(|(c, d, u)| [(*c, grad(d)), (*c, grad(u))])
            .collect();
        (loss.double_value(&[]), grads)
    };
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    LOSS.check(
        "loss with and without checkpointing",
        (l0 - l1).abs() / l0.abs(),
    );
    for component in lora_core::Component::ALL {
        let of = |g: &[(lora_core::Component, Tensor)]| -> Vec<Tensor> {
            g.iter()
                .filter(|(c, _)| *c == component)
                .map(|(_, t)| t.shallow_clone())
                .collect()
        };
        let (a, b) = (of(&g0), of(&g1));
        assert!(!a.is_empty());
        // Compare against the overall gradient scale: some adapters get
        // gradients at the 1e-10 level (pure float noise in both runs).
        let scale = a
            .iter()
            .map(|g| g.abs().max().double_value(&[]))
            .fold(0f64, f64::max);
        assert!(scale > 0.0, "{component:?}: no gradient at all");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs().max().double_value(&[]))
            .fold(0f64, f64::max)
            / scale;
        GRADS.check(format!("{component:?}: gradients (relative)"), worst);
        let live = |g: &[Tensor]| {
            g.iter()
                .filter(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0)
                .count()
        };
        assert!(live(&a) > 0, "{component:?}: no adapter got a gradient");
        assert_eq!(
            live(&a),
            live(&b),
            "{component:?}: checkpointing changes which adapters get gradients"
        );
    }
    m.set_gradient_checkpointing(false);
    m.slots.set_training(false);
}

/// Attaching keeps an adapter's dropouts (the trainer sets them before
/// attaching): the slot's adapter has them, and they act in training mode
/// only.
#[test]
fn attached_adapters_keep_their_dropouts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = tiny_a();
    tch::manual_seed(3);
    let mut set = LoraSet::new();
    let mut keys = Vec::new();
    for t in lora_targets(&m.detected.config, TargetScope::UNET) {
        let (mut a, _, _) = trainable(&t, 4, 0.5);
        a.set_dropouts(Dropouts {
            dropout: 0.1,
            rank_dropout: 0.5,
            module_dropout: 0.2,
        })
        .unwrap();
        keys.push(t.key.clone());
        set.insert(t.key, a);
    }
    m.attach_lora(set, 1.0).unwrap();
    for k in &keys {
        let info = m.slots.get(k).unwrap();
        let d = info.slot.adapters()[0].dropouts();
        assert_eq!(
            (d.dropout, d.rank_dropout, d.module_dropout),
            (0.1, 0.5, 0.2),
            "{}",
            k.kohya_name()
        );
    }
    let io = tiny_a_io();
    let loss_at = |seed: i64| {
        tch::manual_seed(seed);
        tch::no_grad(|| full_forward_loss(&m, &io).double_value(&[]))
    };
    m.slots.set_training(true);
    let (a, b) = (loss_at(1), loss_at(2));
    // effect: in training mode the dropouts change the loss
    assert!((a - b).abs() > 1e-7 * a.abs(), "training: {a} == {b}");
    m.slots.set_training(false);
    assert_eq!(loss_at(1), loss_at(2), "eval must not drop anything");
}
