//! Data pipeline throughput: scan + decode + resize + crop → CHW f32, over 240
//! generated JPEG/PNG images of mixed sizes up to 3000 px, next to the same
//! pipeline in Pillow (benches/pillow_pipeline.py) run by this command.
//!
//! `cargo bench --bench data_pipeline` (Pillow is taken from `.venv`;
//! `make bench` installs it). Prints images/s and the ratio.

#[path = "common/mod.rs"]
mod common;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use lorakit::data::buckets::{place, select_bucket, BucketSpec};
use lorakit::data::image_io::DecodeLimits;
use lorakit::data::loader::{load_item, PlannedItem};
use lorakit::data::{scan, ScanOptions};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const N: usize = 240;
const RESOLUTION: u32 = 768;
const SIZES: &[(u32, u32)] = &[
    (3000, 2000),
    (2000, 3000),
    (1024, 1024),
    (1536, 1024),
    (800, 1200),
    (2400, 2400),
    (1920, 1080),
    (1200, 1600),
];

fn generate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let have = std::fs::read_dir(dir).unwrap().count();
    if have >= 2 * N {
        return;
    }
    eprintln!("generating {N} images into {} (once)…", dir.display());
    (0..N).into_par_iter().for_each(|i| {
        let (w, h) = SIZES[i % SIZES.len()];
        let mut state = i as u32 * 2_654_435_761 + 1;
        let img = RgbImage::from_fn(w, h, |x, y| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let n = (state & 15) as u8;
            Rgb([
                ((x * 255 / w) as u8).wrapping_add(n),
                ((y * 255 / h) as u8).wrapping_add(n),
                (((x + y) / 7) as u8).wrapping_add(i as u8),
            ])
        });
        let (ext, fmt) = if i % 2 == 0 {
            ("jpg", ImageFormat::Jpeg)
        } else {
            ("png", ImageFormat::Png)
        };
        DynamicImage::ImageRgb8(img)
            .save_with_format(dir.join(format!("img{i:03}.{ext}")), fmt)
            .unwrap();
        std::fs::write(
            dir.join(format!("img{i:03}.txt")),
            format!("trig, tag{}", i % 7),
        )
        .unwrap();
    });
}

fn rust_pipeline(dir: &Path) -> (f64, usize) {
    let t = Instant::now();
    let s = scan(
        dir,
        &ScanOptions {
            verify: false,
            ..Default::default()
        },
    )
    .unwrap();
    let buckets = BucketSpec::for_resolution(RESOLUTION).buckets();
    let floats: usize = s
        .images
        .par_iter()
        .enumerate()
        .map(|(i, img)| {
            let (b, _) = select_bucket(&buckets, img.width, img.height).unwrap();
            let item = PlannedItem {
                image: i,
                resolution: RESOLUTION,
                placement: place(b, img.width, img.height, 0.5),
                flip: false,
            };
            load_item(img, &item, &DecodeLimits::default(), [255; 3])
                .unwrap()
                .0
                .len()
        })
        .sum();
    assert!(floats > 0);
    (
        s.images.len() as f64 / t.elapsed().as_secs_f64(),
        s.images.len(),
    )
}

fn python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = Command::new(&venv)
        .args(["-c", "import PIL, numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(venv)
}

fn pillow(py: &Path, dir: &Path, workers: usize) -> f64 {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "txt"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pillow_pipeline.py");
    let out = Command::new(py)
        .arg(script)
        .arg(workers.to_string())
        .arg(RESOLUTION.to_string())
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn main() {
    if !common::benchmarking("data_pipeline") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/pipeline-v1");
    generate(&dir);
    let threads = rayon::current_num_threads();
    let _ = rust_pipeline(&dir); // warm the page cache
    let (rust, n) =
        (0..3)
            .map(|_| rust_pipeline(&dir))
            .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    println!("data pipeline: {n} images (JPEG+PNG, up to 3000 px) → buckets at {RESOLUTION}, Lanczos, CHW f32");
    println!("  lorakit (rayon, {threads} threads): {rust:8.1} images/s");
    match python() {
        Some(py) => {
            let p1 = pillow(&py, &dir, 1);
            let pn = pillow(&py, &dir, threads);
            println!("  Pillow, 1 process:            {p1:8.1} images/s   → lorakit is {:.2}×", rust / p1);
            println!("  Pillow, {threads} processes:          {pn:8.1} images/s   → lorakit is {:.2}×", rust / pn);
        }
        None => println!("  Pillow: not measured (.venv has no Pillow; run `make bench` or `.venv/bin/pip install pillow numpy`)"),
    }
}
