//! Helpers shared by the harness-less benches (`#[path]`-included).
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (where `.venv` and `benches/` live).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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
