//! Peak memory and step time of each network type on the **full-size**
//! SDXL layout (`cargo bench --bench network_memory [-- lora loha …]`),
//! issue 29: the real trainer (`lora_sdxl::train::train_with`) on a random
//! full-size checkpoint in the single-file layout (written once into
//! `target/bench-data`, ~6.9 GB), bf16 base, UNet only, rank 4 / conv 2,
//! batch 1 at 256², cached latents, 3 steps, 2 threads. Each network runs
//! in a fresh child process, so each peak resident memory (`VmHWM`) is its
//! own; the step time is the second step's (from one `Step` event to the
//! next: no validation or save in between), as wall time and as the
//! process's CPU time (`/proc/self/stat`; steadier on a shared machine),
//! and the resident memory before the first step is printed too.
//!
//! | argument | network |
//! |---|---|
//! | `lora` | LoRA + LoCon (the baseline) |
//! | `loha` | LyCORIS LoHa |
//! | `lokr` | LyCORIS LoKr, factor 8 |
//! | `lora_dora`, `loha_dora`, `lokr_dora` | each with `network.dora` |
//!
//! LyCORIS' own figures on the same setting: `benches/lycoris_memory.py`.

#[path = "common/mod.rs"]
mod common;
use common::{peak_rss_mb, root, rss_mb, write_full_size};
use lorakit::sdxl::train::{train_with, Event, ObserveFn, Observers, TrainOptions};
use std::cell::RefCell;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::Instant;

const NETWORKS: [&str; 6] = [
    "lora",
    "loha",
    "lokr",
    "lora_dora",
    "loha_dora",
    "lokr_dora",
];

/// The job of network `which` on `model`, under `dir/out/<which>`.
fn job(dir: &Path, model: &Path, which: &str) -> lorakit::sdxl::JobConfig {
    let mut job = common::bench_job(dir, model, which, 1);
    let (kind, dora) = match which.split_once('_') {
        Some((k, _)) => (k, true),
        None => (which, false),
    };
    job.network.r#type = kind.into();
    job.network.dora = dora;
    if kind == "lokr" {
        job.network.factor = 8;
    }
    (job.network.linear, job.network.linear_alpha) = (4, 4.0);
    (job.network.conv, job.network.conv_alpha) = (2, 2.0);
    job.train.steps = 3;
    job.train.dtype = "bf16".into();
    job.train.train_text_encoder = false;
    job.save.dtype = "bf16".into();
    job
}

/// In the child: trains `which`, prints `peak_MiB before_steps_MiB step_s`.
fn child(dir: &Path, model: &Path, which: &str) {
    tch::set_num_threads(2);
    let _ = std::fs::remove_dir_all(dir.join("out").join(which));
    let job = job(dir, model, which);
    let marks = Rc::new(RefCell::new((f64::NAN, Vec::new())));
    let seen = marks.clone();
    let observers: Observers = vec![Box::new(ObserveFn(move |e: &Event| {
        let mut m = seen.borrow_mut();
        match e {
            Event::Started { .. } => m.0 = rss_mb(),
            Event::Step { .. } => m.1.push((Instant::now(), cpu_seconds())),
            _ => {}
        }
    }))];
    let opts = TrainOptions {
        quiet: true,
        ..TrainOptions::default()
    };
    train_with(&job, &dir.join("job.toml"), &opts, observers).unwrap();
    let (before, steps) = &*marks.borrow();
    let (wall, cpu) = match steps.as_slice() {
        [a, b, ..] => ((b.0 - a.0).as_secs_f64(), b.1 - a.1),
        _ => (f64::NAN, f64::NAN),
    };
    println!("{:.0} {before:.0} {wall:.2} {cpu:.2}", peak_rss_mb());
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    // utime and stime are fields 14 and 15 of the line (11 and 12 here), in clock ticks of 1/100 s
    (f.get(11).copied().unwrap_or(f64::NAN) + f.get(12).copied().unwrap_or(f64::NAN)) / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = root().join("target/bench-data/network_memory");
    let model = root().join("target/bench-data/sdxl_full_size_random_fp16.safetensors");
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&dir, &model, &args[i + 1]);
        return;
    }
    if !common::benchmarking("network_memory") {
        return;
    }
    std::fs::create_dir_all(&dir).unwrap();
    write_full_size(&model);
    let picked: Vec<&str> = NETWORKS
        .into_iter()
        .filter(|n| {
            !args.iter().any(|a| NETWORKS.contains(&a.as_str())) || args.iter().any(|a| a == n)
        })
        .collect();
    println!("full-size SDXL, UNet only, bf16 base, rank 4 / conv 2, batch 1 at 256², 3 steps, 2 threads:");
    println!(
        "  network     peak RSS   before steps   step 2 wall / CPU     vs LoRA (memory, CPU time)"
    );
    let mut baseline: Option<(f64, f64)> = None;
    for which in picked {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--child", which])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<f64> = (text.lines().last().unwrap_or(""))
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        if !out.status.success() || v.len() != 4 {
            let why = out.status.to_string();
            println!(
                "  {which:<10} failed ({why}): {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            continue;
        }
        let (peak, before, wall, cpu) = (v[0] / 1024.0, v[1] / 1024.0, v[2], v[3]);
        if which == "lora" {
            baseline = Some((peak, cpu));
        }
        let ratio = baseline.map_or(String::new(), |(p, c)| {
            format!("{:.2}×, {:.2}×", peak / p, cpu / c)
        });
        println!("  {which:<10} {peak:6.1} GiB   {before:6.1} GiB   {wall:6.1} s / {cpu:6.1} s   {ratio}");
    }
}
