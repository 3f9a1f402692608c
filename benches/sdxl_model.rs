//! SDXL model benchmarks (`cargo bench --bench sdxl_model`):
//!
//! 1. single-file load of a **full-size** SDXL checkpoint (random fp16 values,
//!    every key and shape of SDXL base 1.0, written by this bench's setup into
//!    target/bench-data): time and peak RSS for reading every tensor
//!    (`model inspect`) and for building the whole model (`SdxlModel::load`), each
//!    in a fresh child process, next to the file size;
//! 2. UNet forward time on CPU for the tiny_b fixture config next to the same
//!    forward in diffusers (benches/unet_forward.py, from `.venv`), ratio printed.

#[path = "common/mod.rs"]
mod common;
use common::{peak_rss_mb, root, rss_mb, write_full_size};
use lorakit::sdxl::{detect, Checkpoint, SdxlModel};
use lorakit::tch::{Device, Kind, Tensor};
use std::process::Command;
use std::time::Instant;

fn child(mode: &str, path: &str) {
    let base = rss_mb();
    let t = Instant::now();
    match mode {
        "read-all" => {
            let ck = Checkpoint::open(path).unwrap();
            detect(&ck).unwrap();
            for (k, info) in ck.infos() {
                let _t = ck.load(k, info.kind, Device::Cpu).unwrap();
            }
        }
        "model-load" => {
            let m = SdxlModel::load(path, Kind::Half, Device::Cpu).unwrap();
            std::hint::black_box(&m);
        }
        _ => unreachable!(),
    }
    println!(
        "{:.3} {:.0} {:.0}",
        t.elapsed().as_secs_f64(),
        base,
        peak_rss_mb()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], &args[i + 2]);
        return;
    }
    if !common::benchmarking("sdxl_model") {
        return;
    }
    tch::set_num_threads(2);
    // 1. full-size load
    let dir = root().join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sdxl_full_size_random_fp16.safetensors");
    write_full_size(&file);
    let size_mb = std::fs::metadata(&file).unwrap().len() as f64 / 1048576.0;
    println!("full-size SDXL single file: {size_mb:.0} MiB (fp16)");
    let exe = std::env::current_exe().unwrap();
    for mode in ["read-all", "model-load"] {
        // drop the page cache effect of the previous run as far as we can: report a warm-cache figure
        let out = Command::new(&exe)
            .args(["--child", mode, file.to_str().unwrap()])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = s
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() == 3 {
            println!(
                "  {mode:<11} {:6.1} s   peak RSS {:6.0} MiB (process baseline {:.0} MiB) → {:.2}× file size above baseline",
                v[0],
                v[2],
                v[1],
                (v[2] - v[1]) / size_mb
            );
        } else {
            println!("  {mode}: failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    // 2. tiny UNet forward vs diffusers
    let fx = root().join("crates/lora-sdxl/tests/fixtures");
    let m = SdxlModel::load(fx.join("tiny_b.safetensors"), Kind::Float, Device::Cpu).unwrap();
    let io: std::collections::HashMap<String, Tensor> =
        lorakit::core::io::read_tensors(fx.join("tiny_b_io.safetensors"))
            .unwrap()
            .tensors
            .into_iter()
            .collect();
    let ctx = Tensor::cat(&[&io["te1_hidden"], &io["te2_hidden"]], -1);
    let y = lorakit::sdxl::model::unet::vector_conditioning(&io["te2_pooled"], &io["time_ids"]);
    let iters = 50;
    let ms = tch::no_grad(|| {
        for _ in 0..3 {
            let _ =
                std::hint::black_box(m.unet.forward(&io["latents"], &io["timesteps"], &ctx, &y));
        }
        let t = Instant::now();
        for _ in 0..iters {
            let _ =
                std::hint::black_box(m.unet.forward(&io["latents"], &io["timesteps"], &ctx, &y));
        }
        t.elapsed().as_secs_f64() * 1000.0 / iters as f64
    });
    println!("tiny UNet forward (tiny_b, batch 2, 8×8 latents, fp32 CPU, 2 threads):");
    println!("  lorakit    {ms:8.3} ms");
    let py = root().join(".venv/bin/python");
    let out = Command::new(&py)
        .arg(root().join("benches/unet_forward.py"))
        .arg(fx.join("tiny_b.json"))
        .arg(fx.join("tiny_b.safetensors"))
        .arg(fx.join("tiny_b_io.safetensors"))
        .arg(iters.to_string())
        .arg("2")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let d: f64 = String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(f64::NAN);
            println!(
                "  diffusers  {d:8.3} ms   → lorakit takes {:.2}× diffusers' time",
                ms / d
            );
        }
        _ => println!("  diffusers: not measured (needs .venv with diffusers: `make fixtures`)"),
    }
}
