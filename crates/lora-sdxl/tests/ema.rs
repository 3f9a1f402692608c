//! The EMA of the LoRA weights: equal to diffusers' `EMAModel` (fixture:
//! `scripts/fixtures/ema.py`), saved as the LoRA file when on, resumed exactly.

mod common;
use lora_sdxl::train::ema::Ema;
use lora_sdxl::train::{train, TrainOptions};
use lora_testkit::Tolerance;
use std::collections::HashMap;
use tch::Tensor;

/// fp32 against fp64 of the same 12 updates: 8.5e-8 (ours against
/// diffusers' fp32 is 0 with 2 threads, 1 thread and AVX2-limited MKL,
/// oneDNN and ATen: the same elementwise operations). Margin 11; a decay
/// without its warm-up is off by 1e-2.
const AVERAGE: Tolerance = Tolerance::new(8.5e-8, 11.0, "fp32 vs fp64 of the 12 EMA updates");

#[test]
fn the_average_matches_diffusers_ema_model() {
    let f: HashMap<String, Tensor> = lora_core::io::read_tensors(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ema.safetensors"
    ))
    .unwrap()
    .tensors
    .into_iter()
    .collect();
    for (name, power) in [("plain", None), ("power", Some(2.0 / 3.0))] {
        let init: Vec<Tensor> = (0..2).map(|i| f[&format!("init.{i}")].copy()).collect();
        let mut ema = Ema::new(&init, 0.9, power);
        for s in 0..12 {
            let step: Vec<Tensor> = (0..2).map(|i| f[&format!("walk.{s}.{i}")].copy()).collect();
            ema.update(&step);
        }
        for (i, got) in ema.weights().iter().enumerate() {
            let want = &f[&format!("{name}.{i}")];
            let d = (got - want).abs().max().double_value(&[]);
            AVERAGE.check(format!("{name}.{i}"), d);
        }
        // effect: the average lags the last weights (it is not a copy of them)
        let last = &f["walk.11.0"];
        assert!((&ema.weights()[0] - last).abs().max().double_value(&[]) > 1e-2);
    }
}

#[test]
fn files_hold_the_average_and_a_resumed_run_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 4);
    let job = |name: &str, steps: u64| {
        let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
        c.train.steps = steps;
        c.train.ema_decay = Some(0.9);
        c.save.save_every = 3;
        (c, path)
    };
    let quiet = common::quiet();
    let sorted = common::sorted_tensors;
    let (c, path) = job("straight", 6);
    let r = train(&c, &path, &quiet).unwrap();
    let file = sorted(r.last_lora.as_ref().unwrap());
    // The state keeps the raw weights beside the average; the file is the average.
    let state: HashMap<String, Tensor> =
        lora_core::io::read_tensors(r.run_dir.join("state.safetensors"))
            .unwrap()
            .tensors
            .into_iter()
            .collect();
    let (mut differ, mut n) = (0, 0);
    for (k, t) in &file {
        let Some(stem) = k.strip_suffix(".lora_up.weight") else {
            continue;
        };
        n += 1;
        let raw = &state[&format!("{stem}.up")];
        if !t.equal(raw) {
            differ += 1;
        }
    }
    assert!(
        n > 0 && differ == n,
        "{differ} of {n} up matrices differ from the raw weights"
    );
    let md = lora_core::load_lora(
        r.last_lora.as_ref().unwrap(),
        lora_core::UnknownKeys::Reject,
    )
    .unwrap()
    .metadata;
    assert_eq!(md["lorakit.ema_decay"], "0.9");

    let (c, path) = job("resumed", 3);
    train(&c, &path, &quiet).unwrap();
    let (c, _) = job("resumed", 6);
    let resumed = TrainOptions {
        resume: true,
        ..quiet
    };
    let r = train(&c, &path, &resumed).unwrap();
    let again = sorted(r.last_lora.as_ref().unwrap());
    assert!(
        file.iter()
            .zip(&again)
            .all(|((a, x), (b, y))| a == b && x.equal(y)),
        "a resumed EMA run differs from the straight one"
    );

    // ema_power reaches the average: a warmed-up average is another file.
    let (mut c, path) = job("power", 6);
    c.train.ema_power = Some(2.0 / 3.0);
    let r = train(&c, &path, &common::quiet()).unwrap();
    let powered = sorted(r.last_lora.as_ref().unwrap());
    assert!(
        !file.iter().zip(&powered).all(|((_, x), (_, y))| x.equal(y)),
        "ema_power had no effect on the saved average"
    );

    let (mut c, path) = job("power_alone", 2);
    c.train.ema_decay = None;
    c.train.ema_power = Some(0.67);
    assert_eq!(c.validate(&path).unwrap_err().field, "train.ema_power");
}
