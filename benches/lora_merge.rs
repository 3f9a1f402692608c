//! LoRA file and merge throughput for a full-size SDXL LoCon LoRA
//! (1052 modules, linear rank 16 / conv rank 8, the `lorakit init` defaults).
//!
//! `cargo bench --bench lora_merge`

use criterion::{criterion_group, criterion_main, Criterion};
use lorakit::core::{LoraAdapter, LoraSet};
use lorakit::sdxl::{lora_targets, SdxlConfig, TargetScope};
use lorakit::tch::{Device, Tensor};
use lorakit::Kind;

fn full_set() -> LoraSet {
    tch::manual_seed(0);
    let mut set = LoraSet::new();
    for t in lora_targets(&SdxlConfig::base(), TargetScope::ALL) {
        let rank = if t.uses_conv_rank() { 8 } else { 16 };
        let mut a = LoraAdapter::new(
            t.in_features,
            t.out_features,
            rank,
            None,
            t.geometry,
            Kind::Float,
            Device::Cpu,
        )
        .unwrap();
        let up = Tensor::randn(a.up().size().as_slice(), (Kind::Float, Device::Cpu)) * 0.01;
        a.set_weights(a.down().shallow_clone(), up).unwrap();
        set.insert(t.key, a);
    }
    set
}

fn bench(c: &mut Criterion) {
    let set = full_set();
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
