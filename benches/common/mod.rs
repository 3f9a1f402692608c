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

/// Writes a full-size SDXL base checkpoint (fp16, pattern data) from the manifest, streaming.
pub fn write_full_size(path: &std::path::Path) {
    use std::io::Write;
    if path.exists() {
        return;
    }
    eprintln!(
        "writing a full-size random SDXL checkpoint to {} (once, ~6.9 GB)…",
        path.display()
    );
    let manifest =
        std::fs::read_to_string(root().join("crates/lora-sdxl/tests/fixtures/sdxl_base_keys.tsv"))
            .unwrap();
    let mut rows: Vec<(String, Vec<usize>, &str)> = manifest
        .lines()
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap();
            let shape: Vec<usize> = if s.is_empty() {
                vec![]
            } else {
                s.split(',').map(|d| d.parse().unwrap()).collect()
            };
            let dtype = if k.ends_with("position_ids") {
                "I64"
            } else {
                "F16"
            };
            (k.to_string(), shape, dtype)
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (k, shape, dtype) in &rows {
        let n = shape.iter().product::<usize>().max(1) * if *dtype == "I64" { 8 } else { 2 };
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::with_capacity(1 << 24, std::fs::File::create(&tmp).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    // fp16 values in about [-0.03, 0.03]; position_ids 0..76
    let block: Vec<u8> = (0..(1 << 20))
        .flat_map(|i: u32| half::f16::from_f32(((i % 61) as f32 - 30.0) * 1e-3).to_le_bytes())
        .collect();
    for (k, shape, dtype) in &rows {
        let n = shape.iter().product::<usize>().max(1);
        if *dtype == "I64" {
            for i in 0..n as i64 {
                f.write_all(&(i % 77).to_le_bytes()).unwrap();
            }
        } else {
            let mut left = n * 2;
            while left > 0 {
                let m = left.min(block.len());
                f.write_all(&block[..m]).unwrap();
                left -= m;
            }
        }
        let _ = k;
    }
    f.flush().unwrap();
    drop(f);
    std::fs::rename(tmp, path).unwrap();
}

/// The training benches' job: the tiny model at 256², 12 generated images,
/// LoRA 8 + LoCon 4, fp32 on CPU, 40 steps of `batch` images, no validation
/// or saves in the timed steps; the run goes to `<dir>/out/<name>` (the
/// caller clears it).
pub fn bench_job(
    dir: &std::path::Path,
    model: &std::path::Path,
    name: &str,
    batch: usize,
) -> lorakit::sdxl::JobConfig {
    let data = dir.join("dataset");
    if !data.exists() {
        lorakit::data::synthetic::write_character_dataset(&data, 12, 256, 256, "myakumyaku-san", 7)
            .unwrap();
    }
    let job_path = dir.join("job.toml");
    let mut job = lorakit::sdxl::JobConfig::parse(
        &job_path,
        &lorakit::sdxl::JobConfig::template(
            model.to_str(),
            data.to_str(),
            Some("myakumyaku-san"),
            None,
        ),
    )
    .unwrap();
    job.job.name = name.into();
    job.job.output_dir = dir.join("out");
    job.job.device = Some("cpu".into());
    job.network.linear = 8;
    job.network.linear_alpha = 8.0;
    job.network.conv = 4;
    job.network.conv_alpha = 4.0;
    job.save.save_every = 1000;
    job.validation.every = Some(1000);
    job.validation.images = Some(1);
    job.train.steps = 40;
    job.train.batch_size = batch;
    job.train.gradient_accumulation = 1;
    job.train.lr = 1e-4;
    job.train.dtype = "fp32".into();
    job.datasets[0].resolution = vec![256];
    job
}

/// Seconds per step of a bench run, from its `loss.csv` between steps 10
/// and 30 (after the latent cache is filled).
pub fn seconds_per_step(run_dir: &std::path::Path) -> f64 {
    let csv = std::fs::read_to_string(run_dir.join("loss.csv")).unwrap();
    let at = |step: &str| -> f64 {
        csv.lines()
            .find(|l| l.split(',').next() == Some(step))
            .and_then(|l| l.rsplit(',').next()?.parse().ok())
            .unwrap()
    };
    (at("30") - at("10")) / 20.0
}
