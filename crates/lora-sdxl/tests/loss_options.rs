//! kohya's loss and noise options (and OneTrainer's timestep distributions) against sd-scripts' formulas (fixture:
//! `scripts/fixtures/noise_loss.py`), and in a real run: each one changes
//! what is trained, and contradictory settings are refused.

mod common;
use lora_sdxl::train::noise::multires_noise;
use lora_sdxl::train::schedule::{NoiseSchedule, ScheduleTables};
use lora_sdxl::train::train;
use lora_testkit::Tolerance;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// kohya derives the SNR from an fp32 ᾱ (a cumulative product), ours from
/// f64: the exact f64 weights are 3.2e-6 (relative) from kohya's, ours 3.2e-6
/// (1.7e-6 for ε), in every configuration; ours against f64 is 9e-8. Margin
/// 4 (the old 1e-5 was 3.1 × this); an SNR capped at 100 instead of 1000 moves
/// the t = 0 weight by 2.
const DEBIASED: Tolerance = Tolerance::new(3.3e-6, 4.0, "kohya's fp32 schedule against f64");

/// The pyramid against kohya's: 2.4e-7 with ATen held to its default path
/// (0 on AVX-512, with 2 threads or 1); margin 41.
const MULTIRES: Tolerance = Tolerance::new(2.4e-7, 41.0, "ATen's SIMD path (AVX-512 vs default)");

/// A change to a job.
type Edit = dyn Fn(&mut lora_sdxl::JobConfig);

fn fixture() -> HashMap<String, Tensor> {
    common::fixture_tensors("noise_loss.safetensors")
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    ((&a - &b).abs() / b.abs().clamp_min(1e-12))
        .max()
        .double_value(&[])
}

#[test]
fn debiased_estimation_weights_match_kohya() {
    let f = fixture();
    let tables = ScheduleTables::new(&NoiseSchedule::sdxl(false), Device::Cpu);
    let ts = &f["debiased.timesteps"];
    let eps = tables.debiased_weights(ts, false);
    let v = tables.debiased_weights(ts, true);
    DEBIASED.check("ε weights (relative)", max_rel(&eps, &f["debiased.eps"]));
    DEBIASED.check("v weights (relative)", max_rel(&v, &f["debiased.v"]));
}

#[test]
fn multires_noise_matches_kohyas_pyramid() {
    let f = fixture();
    let factors: Vec<f64> = Vec::<f64>::try_from(&f["multires.factors"]).unwrap();
    let mut level = 0;
    let mut draw = |shape: &[i64]| {
        let t = f[&format!("multires.draw.{level}")].shallow_clone();
        assert_eq!(t.size(), shape, "level {level}");
        level += 1;
        t
    };
    let out = multires_noise(&f["multires.noise"], 0.3, &factors, &mut draw);
    let d = (&out - &f["multires.out"]).abs().max().double_value(&[]);
    MULTIRES.check("multi-resolution noise", d);
    assert_eq!(level, factors.len(), "stops at the first 1-pixel side");
}

#[test]
fn each_option_changes_the_trained_lora_and_contradictions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 4);
    let run = |name: &str, edit: &Edit| {
        let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
        edit(&mut c);
        train(&c, &path, &common::quiet())
            .map(|r| common::sorted_tensors(r.last_lora.as_ref().unwrap()))
    };
    let plain = run("plain", &|_| {}).unwrap();
    let again = run("again", &|_| {}).unwrap();
    let same = |a: &[(String, Tensor)], b: &[(String, Tensor)]| {
        a.iter().zip(b).all(|((_, x), (_, y))| x.equal(y))
    };
    assert!(
        same(&plain, &again),
        "the same job must train the same LoRA"
    );
    let options: [(&str, &Edit); 8] = [
        ("debiased", &|c| c.train.debiased_estimation_loss = true),
        ("multires", &|c| c.train.multires_noise_iterations = 6),
        ("multires_discount", &|c| {
            c.train.multires_noise_iterations = 6;
            c.train.multires_noise_discount = 0.8;
        }),
        ("ip_noise", &|c| c.train.ip_noise_gamma = 0.1),
        ("ip_noise_random", &|c| {
            c.train.ip_noise_gamma = 0.1;
            c.train.ip_noise_gamma_random_strength = true;
        }),
        ("sigmoid_timesteps", &|c| {
            c.train.timestep_sampling = "sigmoid".into();
            c.train.sigmoid_scale = Some(5.0);
        }),
        ("logit_normal_timesteps", &|c| {
            c.train.timestep_sampling = "logit_normal".into()
        }),
        ("timestep_shift", &|c| c.train.timestep_shift = 3.0),
    ];
    let mut trained = Vec::new();
    for (name, edit) in options {
        let lora = run(name, edit).unwrap();
        assert!(!same(&plain, &lora), "{name} had no effect on the LoRA");
        trained.push(lora);
    }
    assert!(
        !same(&trained[3], &trained[4]),
        "random strength had no effect"
    );
    assert!(
        !same(&trained[1], &trained[2]),
        "multires_noise_discount had no effect"
    );

    let e = run("both", &|c| {
        c.train.noise_offset = 0.05;
        c.train.multires_noise_iterations = 6;
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.multires_noise_iterations"), "{e}");
    let e = run("random_alone", &|c| {
        c.train.ip_noise_gamma_random_strength = true
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("ip_noise_gamma"), "{e}");
}
