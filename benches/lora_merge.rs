//! LoRA file and merge throughput for a full-size SDXL LoCon LoRA
//! (1052 modules, linear rank 16 / conv rank 8, the `lorakit init` defaults).
//!
//! `cargo bench --bench lora_merge`

#[path = "common/mod.rs"]
mod common;

use common::full_sdxl_lora;
use criterion::{criterion_group, criterion_main, Criterion};
use lorakit::core::LoraSet;
use lorakit::Kind;

fn bench(c: &mut Criterion) {
    let set = full_sdxl_lora(16, 8);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.safetensors");
    let meta = Default::default();
    let mut g = c.benchmark_group("sdxl_locon_r16");
    g.sample_size(10);
    g.bench_function("save_fp16_with_hashes", |b| {
        b.iter(|| set.save(&path, Kind::Half, &meta).unwrap())
    });
    set.save(&path, Kind::Half, &meta).unwrap();
    g.bench_function("load_and_normalise", |b| {
        b.iter(|| LoraSet::load(&path).unwrap())
    });
    g.bench_function("delta_weights_all_modules", |b| {
        b.iter(|| {
            for (_, a) in set.iter() {
                let _ = a.delta_weight();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
