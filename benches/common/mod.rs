//! Helpers shared by the harness-less benches (`#[path]`-included).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The repository root (where `.venv` and `benches/` live).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True under `cargo bench`. `cargo test --all-targets` also runs the
/// harness-less bench targets (without `--bench`): there, building them is
/// the test, and this prints how to measure instead.
pub fn benchmarking(name: &str) -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        println!("{name}: run with `cargo bench --bench {name}`");
    }
    yes
}

/// A `/proc/self/status` memory field (`VmHWM`, `VmRSS`) in MiB.
fn status_mb(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Peak resident memory of this process so far, MiB.
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Current resident memory, MiB.
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

/// Runs `benches/<script>` with the project's `.venv` Python; returns the
/// JSON object on its last stdout line (`None`, with the script's stderr
/// printed, when it fails or is missing).
pub fn python_json(script: &str, args: &[String]) -> Option<serde_json::Value> {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("benches").join(script))
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim().lines().last()?).ok()
}

/// The field `key` of [`python_json`]'s answer.
pub fn python(script: &str, args: &[String], key: &str) -> Option<f64> {
    python_json(script, args)?.get(key)?.as_f64()
}

/// A full-size SDXL LoCon LoRA (every kohya target of UNet and both text
/// encoders) with random weights: kaiming `down`, `up` ~ N(0, 0.01²).
pub fn full_sdxl_lora(rank: i64, conv_rank: i64) -> lorakit::core::LoraSet {
    use lorakit::sdxl::{SdxlConfig, TargetScope};
    tch::manual_seed(0);
    lorakit::sdxl::synthetic::random_lora(
        &SdxlConfig::base(),
        TargetScope::ALL,
        rank,
        conv_rank,
        0.01,
    )
    .unwrap()
}
