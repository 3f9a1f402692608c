//! The UI's dataset listing on a 10,000-image dataset, cold and warm: a
//! scan with a facts file (`ScanOptions::facts`, what `lorakit ui` uses)
//! reads and hashes every image once; the second scan of the unchanged
//! folder takes sizes and hashes from the facts file and reads no image.
//!
//! `cargo bench --bench dataset_listing` (generates the images into
//! `target/bench-data/listing` once: 10,000 noise PNGs of 256 × 256,
//! about 2 GB). Prints cold, warm and the ratio. Measured on the 2-core dev
//! machine (NVMe, sha256 with SHA extensions): 0.81 s cold / 0.137 s warm
//! with the images in the page cache, 2.76 s / 0.18 s after
//! `echo 1 > /proc/sys/vm/drop_caches`; a slow disk or NFS widens the gap.

use lorakit::data::{scan, ScanOptions};
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

const N: usize = 10_000;
const SIDE: u32 = 256;

fn generate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    if std::fs::read_dir(dir).unwrap().count() >= 2 * N {
        return;
    }
    eprintln!("generating {N} images into {} (once)…", dir.display());
    (0..N).into_par_iter().for_each(|i| {
        let mut state = i as u32 | 1;
        let img = image::RgbImage::from_fn(SIDE, SIDE, |_, _| {
            // xorshift noise: incompressible, so each file is its full size
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        img.save(dir.join(format!("{i:05}.png"))).unwrap();
        std::fs::write(dir.join(format!("{i:05}.txt")), "trig, a, b").unwrap();
    });
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/listing");
    let data = root.join("data");
    generate(&data);
    let facts = root.join("facts.json");
    let _ = std::fs::remove_file(&facts);
    let opts = ScanOptions {
        verify: false,
        facts: Some(facts),
        ..Default::default()
    };
    let bytes: u64 = (std::fs::read_dir(&data).unwrap())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let t0 = Instant::now();
    let cold = scan(&data, &opts).unwrap();
    let cold_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let warm = scan(&data, &opts).unwrap();
    let warm_s = t0.elapsed().as_secs_f64();
    assert_eq!(cold.images, warm.images);
    println!(
        "dataset listing, {} images ({:.2} GB, the page cache as found): cold {cold_s:.2} s (reads and hashes every image), warm {warm_s:.3} s (facts file) — {:.0}× faster",
        cold.images.len(),
        bytes as f64 / 1e9,
        cold_s / warm_s
    );
}
