//! Timestep distributions against OneTrainer's formulas (fixture:
//! `scripts/fixtures/timesteps.py`): the sigmoid weights, the continuous
//! path with its shift, and the sampler's draws; bad settings are refused.

mod common;
use lora_sdxl::train::job::TrainSection;
use lora_sdxl::train::timesteps::{sigmoid_weights, TimestepSampler, TimestepSampling};
use lora_testkit::Tolerance;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// The weights against OneTrainer's, relative: 8.0e-7 measured (7.6e-7 with
/// 2 threads or 1, 8.0e-7 with ATen held to its default path); margin 12.
const WEIGHTS: Tolerance = Tolerance::new(8.0e-7, 12.0, "fp32 sigmoid, ATen SIMD path");

/// A statistic of 200 000 draws is off its expectation by about its standard
/// error: σ/√n ≤ 0.65 for a mean here (σ ≤ 289, the uniform's), 0.41 for a
/// standard deviation. The draws are the same with 2 threads, 1 thread and
/// AVX2-limited MKL/oneDNN/ATen: deviations 0.15–0.85. Margin 4.6 (the old
/// bound of 3 steps); a wrong shift or bias moves a mean by tens of steps.
const DRAWS: Tolerance = Tolerance::new(0.65, 4.6, "standard error of a 200 000-draw mean");

fn fixture() -> HashMap<String, Tensor> {
    common::fixture_tensors("timesteps.safetensors")
}

fn params(f: &HashMap<String, Tensor>, key: &str) -> Vec<f64> {
    Vec::<f64>::try_from(&f[key]).unwrap()
}

fn section(kind: &str, edit: impl FnOnce(&mut TrainSection)) -> TrainSection {
    let mut t = TrainSection {
        timestep_sampling: kind.into(),
        ..Default::default()
    };
    edit(&mut t);
    t
}

#[test]
fn sigmoid_weights_match_onetrainer() {
    let f = fixture();
    for i in 0..4 {
        let p = params(&f, &format!("sigmoid.{i}.params"));
        let want = &f[&format!("sigmoid.{i}.weights")];
        let got = sigmoid_weights(1000, p[0], p[1], p[2]);
        let rel = ((&got - want).abs() / want.abs().clamp_min(1e-12))
            .max()
            .double_value(&[]);
        WEIGHTS.check(format!("setting {p:?}: relative error"), rel);
    }
}

#[test]
fn the_continuous_path_and_its_shift_match_onetrainer() {
    let f = fixture();
    let u = &f["continuous.u"];
    for i in 0..3 {
        let p = params(&f, &format!("continuous.{i}.params"));
        let t = section("uniform", |t| {
            t.min_timestep = p[0] as u32;
            t.max_timestep = p[1] as u32;
            t.timestep_shift = p[2];
        });
        let got = TimestepSampler::new(
            &t,
            TimestepSampling::parse(&t.timestep_sampling).unwrap(),
            Device::Cpu,
        )
        .from_unit(u);
        let want = &f[&format!("continuous.{i}.timesteps")];
        let differ = got.ne_tensor(want).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            differ, 0,
            "setting {p:?}: {differ} of 4096 timesteps differ"
        );
    }
}

fn draws(t: &TrainSection) -> Tensor {
    tch::manual_seed(3);
    let ts = TimestepSampler::new(
        t,
        TimestepSampling::parse(&t.timestep_sampling).unwrap(),
        Device::Cpu,
    )
    .sample(200_000, Device::Cpu);
    assert_eq!(ts.kind(), Kind::Int64);
    ts.to_kind(Kind::Double)
}

#[test]
fn the_sampler_draws_each_distribution() {
    let f = fixture();
    let mean = |t: &Tensor| t.mean(Kind::Double).double_value(&[]);
    let std = |t: &Tensor| t.std(true).double_value(&[]);

    let uniform = draws(&section("uniform", |_| {}));
    DRAWS.check("uniform: mean", (mean(&uniform) - 499.5).abs());
    let ranged = draws(&section("uniform", |t| {
        t.min_timestep = 200;
        t.max_timestep = 300;
    }));
    assert_eq!(ranged.min().double_value(&[]), 200.0);
    assert_eq!(ranged.max().double_value(&[]), 299.0);
    let shifted = draws(&section("uniform", |t| t.timestep_shift = 3.0));
    // E[3t/(2t/1000 + 1)] over t ~ U(0, 1000), minus ~0.5 for truncation
    let expected = 1000.0 * 1.5 * (1.0 - 3f64.ln() / 2.0) - 0.5;
    DRAWS.check("shift 3: mean", (mean(&shifted) - expected).abs());

    for i in 0..2 {
        let p = params(&f, &format!("logit_normal.{i}.params"));
        let ts = draws(&section("logit_normal", |t| {
            t.sigmoid_scale = Some(p[0]);
            t.sigmoid_bias = p[1];
        }));
        let (m, s) = (mean(&ts), std(&ts));
        let (want_m, want_s) = (
            params(&f, &format!("logit_normal.{i}.mean"))[0],
            params(&f, &format!("logit_normal.{i}.std"))[0],
        );
        DRAWS.check(format!("logit-normal {p:?}: mean"), (m - want_m).abs());
        DRAWS.check(format!("logit-normal {p:?}: std"), (s - want_s).abs());
    }

    for i in 0..4 {
        let p = params(&f, &format!("sigmoid.{i}.params"));
        let ts = draws(&section("sigmoid", |t| {
            t.sigmoid_scale = Some(p[0]);
            t.sigmoid_bias = p[1];
            t.timestep_shift = p[2];
        }));
        let w = f[&format!("sigmoid.{i}.weights")].to_kind(Kind::Double);
        let idx = Tensor::arange(1000, (Kind::Double, Device::Cpu));
        let want = ((&w * idx).sum(Kind::Double) / w.sum(Kind::Double)).double_value(&[]);
        DRAWS.check(format!("sigmoid {p:?}: mean"), (mean(&ts) - want).abs());
    }
}

#[test]
fn settings_without_effect_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = common::tiny_model_and_dataset(dir.path(), 2);
    let check = |edit: &dyn Fn(&mut TrainSection), field: &str| {
        let (mut c, path) = common::small_cpu_job(dir.path(), &model, &data, "t");
        edit(&mut c.train);
        let e = c.validate(&path).unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    };
    check(
        &|t| t.timestep_sampling = "sigmoid".into(),
        "train.sigmoid_scale",
    );
    check(
        &|t| {
            t.timestep_sampling = "sigmoid".into();
            t.sigmoid_scale = Some(0.0);
        },
        "train.sigmoid_scale",
    );
    check(&|t| t.sigmoid_scale = Some(2.0), "train.sigmoid_scale");
    check(&|t| t.sigmoid_bias = 0.2, "train.sigmoid_bias");
    check(
        &|t| {
            t.timestep_sampling = "logit_normal".into();
            t.sigmoid_scale = Some(-1.0);
        },
        "train.sigmoid_scale",
    );
    check(
        &|t| t.timestep_sampling = "cosmap".into(),
        "train.timestep_sampling",
    );
}
