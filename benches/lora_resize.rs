//! Rank reduction of a full-size SDXL LoCon LoRA (linear rank 32 / conv 16 →
//! 16 / 8), lorakit's QR + r×r-core SVD next to the merge-then-full-SVD route
//! of kohya's resize_lora.py in PyTorch (`benches/resize_reference.py`), on
//! the same modules, CPU, 2 threads each; also checks both keep the same
//! share of ΔW's Frobenius norm. Then the SVD step of extraction (rank 32
//! from full ΔW matrices of the same modules' shapes: a rank-256 part plus
//! noise, generated identically on both sides) next to torch.linalg.svd as
//! kohya's extract_lora_from_models.py runs it (`benches/extract_reference.py`).
//!
//! `cargo bench --bench lora_resize`

#[path = "common/mod.rs"]
mod common;

use common::{full_sdxl_lora, python_json};
use lorakit::core::resize::{
    adapter_from_delta, resize_adapter, resize_set, RankRule, ResizeOptions,
};
use lorakit::core::Geometry;
use lorakit::tch::{Device, Tensor};
use lorakit::Kind;
use std::time::Instant;

const THREADS: usize = 2;
const EVERY: u32 = 8;

fn main() {
    if !common::benchmarking("lora_resize") {
        return;
    }
    tch::set_num_threads(THREADS as i32);
    let set = full_sdxl_lora(32, 16);
    let opts = ResizeOptions {
        rank: 16,
        conv_rank: 8,
        rule: RankRule::Fixed,
    };
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        let (out, _) = resize_set(&set, &opts).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(out.len(), set.len());
    }
    println!(
        "lorakit: all {} modules of a full-size SDXL LoCon (rank 32/16 → 16/8) in {best:.2} s (best of 3)",
        set.len()
    );

    // the subset the reference resizes too
    let chosen: Vec<_> = set
        .iter()
        .filter(|(k, _)| k.kohya_name().bytes().map(u32::from).sum::<u32>() % EVERY == 0)
        .collect();
    let t = Instant::now();
    let mut fro = 0.0;
    for (_, a) in &chosen {
        let max = if a.geometry().is_spatial_conv() {
            opts.conv_rank
        } else {
            opts.rank
        };
        fro += resize_adapter(a, max, RankRule::Fixed)
            .unwrap()
            .1
            .fro_retained;
    }
    let ours = t.elapsed().as_secs_f64();
    let fro = fro / chosen.len() as f64;
    println!(
        "lorakit: {} of them (kohya name byte sum % {EVERY} == 0) in {ours:.3} s, Frobenius kept {:.4}%",
        chosen.len(),
        100.0 * fro
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r32.safetensors");
    set.save(&file, Kind::Float, &Default::default()).unwrap();
    let args: Vec<String> = vec![
        file.to_string_lossy().into_owned(),
        "16".into(),
        "8".into(),
        EVERY.to_string(),
        THREADS.to_string(),
    ];
    match reference("resize_reference.py", &args) {
        Some((theirs, their_fro)) => {
            println!(
                "merge + full SVD (PyTorch, kohya's route): same modules in {theirs:.3} s, Frobenius kept {:.4}%",
                100.0 * their_fro
            );
            println!(
                "ratio lorakit / reference: {:.4}× (the reference takes {:.0}× as long; |Δ Frobenius kept| = {:.1e})",
                ours / theirs,
                theirs / ours,
                (fro - their_fro).abs()
            );
        }
        _ => println!("(no .venv with torch + safetensors: reference side skipped)"),
    }

    extraction(&chosen);
}

/// A reference script's `seconds` and `fro_mean` (`None` without a usable .venv).
fn reference(script: &str, args: &[String]) -> Option<(f64, f64)> {
    let v = python_json(script, args)?;
    Some((v.get("seconds")?.as_f64()?, v.get("fro_mean")?.as_f64()?))
}

/// Module i's ΔW, generated as benches/extract_reference.py does.
fn delta(i: usize, out: i64, inn: i64) -> Tensor {
    tch::manual_seed(i as i64);
    let opts = (Kind::Float, Device::Cpu);
    let a = Tensor::randn([out, 256], opts);
    let b = Tensor::randn([256, inn], opts);
    let n = Tensor::randn([out, inn], opts);
    a.matmul(&b) / 16.0 + n * 0.1
}

fn extraction(chosen: &[(&lorakit::core::ModuleKey, &lorakit::core::LoraAdapter)]) {
    const RANK: i64 = 32;
    let shapes: Vec<(i64, i64)> = chosen
        .iter()
        .map(|(_, a)| {
            let inner: i64 = a.down().expect("a LoRA pair").size()[1..].iter().product();
            (a.out_features(), inner)
        })
        .collect();
    let mut seconds = 0.0;
    let mut fro = 0.0;
    for (i, &(out, inn)) in shapes.iter().enumerate() {
        let d = delta(i, out, inn);
        let t = Instant::now();
        let (_, st) = adapter_from_delta(&d, RANK, Geometry::Linear, None).unwrap();
        seconds += t.elapsed().as_secs_f64();
        fro += st.fro_retained;
    }
    let fro = fro / shapes.len() as f64;
    println!(
        "extraction SVD, rank {RANK}, the same {} module shapes (rank-256 ΔW + noise): lorakit {seconds:.2} s, ‖ΔW‖_F kept {:.4}%",
        shapes.len(),
        100.0 * fro
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shapes.json");
    std::fs::write(&file, serde_json::to_string(&shapes).unwrap()).unwrap();
    let args = vec![
        file.to_string_lossy().into_owned(),
        RANK.to_string(),
        THREADS.to_string(),
    ];
    match reference("extract_reference.py", &args) {
        Some((theirs, their_fro)) => println!(
            "torch.linalg.svd (kohya's extractor): {theirs:.2} s, ‖ΔW‖_F kept {:.4}%; ratio {:.3}× (randomized SVD keeps {:.4} points less of the norm)",
            100.0 * their_fro,
            seconds / theirs,
            100.0 * (their_fro - fro)
        ),
        _ => println!("(no .venv with torch: reference side skipped)"),
    }
}
