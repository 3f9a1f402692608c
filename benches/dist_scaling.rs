//! Data-parallel scaling (`lorakit train --nproc N`): the same job (tiny
//! SDXL-architecture model, 256², global batch 2, rank 8 / conv 4, fp32) as
//! one process × batch 2 and as two ranks × batch 1 on this machine's CPU
//! (Gloo over 127.0.0.1, the cores split between the ranks), in steps/s and
//! samples/s; and, on paper, the gradient bytes an SDXL LoRA all-reduces per
//! step against NVLink and PCIe bandwidth.
//!
//! `cargo bench --bench dist_scaling` (figures in BENCHMARKS.md).

#[path = "common/mod.rs"]
mod common;

use lorakit::sdxl::dist::{DistEnv, ProcessGroup};
use lorakit::sdxl::train::{train, TrainOptions};
use lorakit::sdxl::{SdxlConfig, TargetScope};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tch::Kind;

const GLOBAL_BATCH: usize = 2;

/// One rank (or the single process): trains and prints its s/step over
/// steps 10 → 30 (rank 0 only).
fn child(dir: &Path, model: &Path, world: usize) {
    let name = format!("ranks{world}");
    let job = common::bench_job(dir, model, &name, GLOBAL_BATCH / world);
    let dist = DistEnv::from_env()
        .unwrap()
        .map(|e| Arc::new(ProcessGroup::join(&e).unwrap()));
    let main = dist.as_ref().is_none_or(|pg| pg.is_main());
    let opts = TrainOptions {
        quiet: true,
        dist,
        ..TrainOptions::default()
    };
    train(&job, &dir.join("job.toml"), &opts).unwrap();
    if main {
        println!("{}", common::seconds_per_step(&dir.join("out").join(name)));
    }
}

/// Runs the job in `world` processes, the cores split between them; s/step.
fn run(dir: &Path, model: &Path, world: usize) -> f64 {
    let _ = std::fs::remove_dir_all(dir.join(format!("out/ranks{world}")));
    let port = lorakit::sdxl::dist::free_port().unwrap();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut c = Command::new(std::env::current_exe().unwrap());
            // world 1: WORLD_SIZE=1 is no data-parallel run, only the threads
            c.args(["--child", dir.to_str().unwrap(), model.to_str().unwrap()])
                .arg(world.to_string())
                .envs(DistEnv::local(rank, world, port).child_vars());
            c.stdout(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    let outs: Vec<String> = children
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned())
        .collect();
    outs[0].trim().parse().unwrap_or(f64::NAN)
}

/// Gradient bytes per step of the default job's LoRA (UNet, rank 16, conv
/// 8) on full-size SDXL, and the time a ring all-reduce of them takes.
fn on_paper() {
    let scope = TargetScope {
        te1: false,
        te2: false,
        ..TargetScope::ALL
    };
    let lora =
        lorakit::sdxl::synthetic::random_lora(&SdxlConfig::base(), scope, 16, 8, 0.01).unwrap();
    let params: i64 = lora.parameters().iter().map(|t| t.numel() as i64).sum();
    let bytes = params as f64 * 4.0; // fp32 gradients
    println!(
        "SDXL UNet LoRA rank 16 / conv 8: {} modules, {:.1} M parameters, {:.0} MB of fp32 gradients per step",
        lora.len(),
        params as f64 / 1e6,
        bytes / 1e6
    );
    for (link, gb_s) in [
        ("NVLink 4 (H100/H200 SXM, ~360 GB/s bus bandwidth)", 360.0),
        ("PCIe 4.0 x16 (~22 GB/s)", 22.0),
        ("PCIe 5.0 x16 (~45 GB/s)", 45.0),
        ("10 GbE between machines (~1.1 GB/s)", 1.1),
    ] {
        let times: Vec<String> = [2usize, 4, 8]
            .iter()
            .map(|&n| {
                // a ring all-reduce moves 2 (n − 1) / n of the buffer per GPU
                let s = bytes * 2.0 * (n - 1) as f64 / n as f64 / (gb_s * 1e9);
                format!("{n} GPUs {:.1} ms", s * 1e3)
            })
            .collect();
        println!("  {link}: {}", times.join(", "));
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--child") {
        child(
            Path::new(&argv[i + 1]),
            Path::new(&argv[i + 2]),
            argv[i + 3].parse().unwrap(),
        );
        return;
    }
    if !common::benchmarking("dist_scaling") {
        return;
    }
    on_paper();
    let dir = common::root().join("target/bench-data/dist_scaling");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny_sdxl.safetensors");
    lorakit::sdxl::synthetic::write_random_checkpoint(&model, &SdxlConfig::tiny(), 11, Kind::Float)
        .unwrap();
    // the dataset, written once before the ranks read it
    let _ = common::bench_job(&dir, &model, "setup", GLOBAL_BATCH);
    let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
    // alternate the sides on this noisy shared machine, best of three each
    let (mut one, mut two) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        one = one.min(run(&dir, &model, 1));
        two = two.min(run(&dir, &model, 2));
    }
    let per_s = |s: f64| GLOBAL_BATCH as f64 / s;
    println!("tiny SDXL, 256², global batch {GLOBAL_BATCH}, {cores} cores (best of 3):");
    println!(
        "  1 rank × batch 2 ({cores} threads): {one:.3} s/step, {:.2} samples/s",
        per_s(one)
    );
    println!(
        "  2 ranks × batch 1 ({} thread(s) each): {two:.3} s/step, {:.2} samples/s ({:.2}× the single process)",
        (cores / 2).max(1),
        per_s(two),
        one / two
    );
}
