//! Compute of the factored training forward against the materialised one
//! (`cargo bench --bench factored_forward`), issue 29, deliverable 4: one
//! forward + backward of an adapted layer at SDXL's shapes for a 256²
//! image (bf16 input and base weight, fp32 adapter, as the trainer runs
//! them), through `LoraAdapter::delta_with_base` (factored) and through the
//! full `ΔW` / `W'` formed from the public API (`delta_weight`,
//! `dora::decomposed`: what the training forward did before). Best of 5
//! after a warm-up, the two sides alternated, 2 threads.

#[path = "common/mod.rs"]
mod common;
use lorakit::core::geometry::layer_op;
use lorakit::core::lycoris::LycoAdapter;
use lorakit::core::{dora, Geometry, LoraAdapter};
use lorakit::tch::{Device, Kind, Tensor};
use std::time::Instant;

/// A layer of SDXL's UNet at 256² (latents 32², so 16² tokens at 640
/// channels and 8² at 1280).
struct Layer {
    name: &'static str,
    geometry: Geometry,
    in_f: i64,
    out_f: i64,
    input: Vec<i64>,
}

fn layers() -> Vec<Layer> {
    let conv = Geometry::Conv2d {
        kernel: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
    };
    vec![
        Layer {
            name: "attn 640 (256 tokens)",
            geometry: Geometry::Linear,
            in_f: 640,
            out_f: 640,
            input: vec![1, 256, 640],
        },
        Layer {
            name: "attn 1280 (64 tokens)",
            geometry: Geometry::Linear,
            in_f: 1280,
            out_f: 1280,
            input: vec![1, 64, 1280],
        },
        Layer {
            name: "ff 1280→10240",
            geometry: Geometry::Linear,
            in_f: 1280,
            out_f: 10240,
            input: vec![1, 64, 1280],
        },
        Layer {
            name: "conv 3×3 1280 (8²)",
            geometry: conv,
            in_f: 1280,
            out_f: 1280,
            input: vec![1, 1280, 8, 8],
        },
    ]
}

/// The adapter `which` (`loha`, `lokr`, `lora_dora`, …) for `l`: rank 4
/// (LoKr factor 8), random non-zero factors with gradients.
fn adapter(which: &str, l: &Layer, base: &Tensor) -> LoraAdapter {
    let opts = (Kind::Float, Device::Cpu);
    let kind = which.split('_').next().unwrap();
    let mut a = match kind {
        "loha" => LoraAdapter::from_lyco(
            LycoAdapter::new_loha(l.in_f, l.out_f, 4, Some(4.0), l.geometry, opts).unwrap(),
        ),
        "lokr" => LoraAdapter::from_lyco(
            LycoAdapter::new_lokr(l.in_f, l.out_f, 4, Some(4.0), (8, false), l.geometry, opts)
                .unwrap(),
        ),
        _ => LoraAdapter::new(
            l.in_f,
            l.out_f,
            4,
            Some(4.0),
            l.geometry,
            Kind::Float,
            Device::Cpu,
        )
        .unwrap(),
    };
    if which.ends_with("dora") {
        a.enable_dora(base).unwrap();
    }
    let params: Vec<Tensor> = (a.parameters().iter())
        .map(|p| {
            (Tensor::randn(p.size().as_slice(), opts) * 0.05 + p.to_kind(Kind::Float))
                .set_requires_grad(true)
        })
        .collect();
    a.set_parameters(params).unwrap();
    a
}

/// The branch through the full `ΔW` (and `W'` with DoRA), as before.
fn materialised(a: &LoraAdapter, x: &Tensor, base: &Tensor) -> Tensor {
    let dw = a.delta_weight();
    match a.dora_scale() {
        None => layer_op(a.geometry(), x, &dw.view_as(base).to_kind(x.kind())),
        Some(m) => {
            let w = base.to_kind(Kind::Float);
            let d = dora::decomposed(&w, &dw.view_as(&w), m) - &w;
            layer_op(a.geometry(), x, &d.to_kind(x.kind()))
        }
    }
}

fn time(f: &dyn Fn() -> Tensor, x: &Tensor) -> f64 {
    let t = Instant::now();
    f().to_kind(Kind::Float).sum(Kind::Float).backward();
    let _ = x.grad();
    t.elapsed().as_secs_f64()
}

fn main() {
    if !common::benchmarking("factored_forward") {
        return;
    }
    tch::set_num_threads(2);
    tch::manual_seed(0);
    println!("forward + backward of one adapted layer (rank 4, LoKr factor 8), bf16 input and base, 2 threads, best of 5:");
    println!(
        "  {:<24} {:<10} {:>10} {:>13}  ratio",
        "layer", "network", "factored", "materialised"
    );
    for l in layers() {
        let mut wshape = vec![l.out_f, l.in_f];
        if let Geometry::Conv2d { kernel, .. } = l.geometry {
            wshape.extend(kernel);
        }
        let base = (Tensor::randn(wshape.as_slice(), (Kind::Float, Device::Cpu)) * 0.02)
            .to_kind(Kind::BFloat16);
        for which in ["loha", "lokr", "lora_dora", "loha_dora", "lokr_dora"] {
            let a = adapter(which, &l, &base);
            let x = Tensor::randn(l.input.as_slice(), (Kind::BFloat16, Device::Cpu))
                .set_requires_grad(true);
            let factored = || a.delta_with_base(&x, &base, true).unwrap();
            let full = || materialised(&a, &x, &base);
            let (_, _) = (time(&factored, &x), time(&full, &x));
            let (mut f, mut m) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..5 {
                f = f.min(time(&factored, &x));
                m = m.min(time(&full, &x));
            }
            println!(
                "  {:<24} {which:<10} {:>8.1} ms {:>10.1} ms  {:.2}×",
                l.name,
                f * 1e3,
                m * 1e3,
                f / m
            );
        }
    }
}
