//! Noise schedule, LR schedules, AdamW and clipping against diffusers/torch
//! references (scripts/fixtures/training_math.py).

use lora_sdxl::optim::{clip_grad_norm, AdamW};
use lora_sdxl::schedule::{per_sample_loss, LrSchedule, NoiseSchedule};
use tch::{Device, Kind, Tensor};

fn reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/training_math.json"
        ))
        .unwrap(),
    )
    .unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let r = reference();
    for (name, zt) in [("default", false), ("ztsnr", true)] {
        let s = NoiseSchedule::sdxl(zt);
        let e = &r["alphas_cumprod"][name];
        for (t, want) in e["t"].as_array().unwrap().iter().zip(floats(&e["value"])) {
            let got = s.alphas_cumprod()[t.as_u64().unwrap() as usize];
            assert!((got - want).abs() < 2e-6, "{name} t={t}: {got} vs {want}");
        }
    }
    assert_eq!(NoiseSchedule::sdxl(true).alphas_cumprod()[999], 0.0);
}

#[test]
fn noising_and_targets() {
    let tables = NoiseSchedule::sdxl(false).tables(Device::Cpu);
    tch::manual_seed(1);
    let x0 = Tensor::randn([3, 4, 2, 2], (Kind::Float, Device::Cpu));
    let eps = Tensor::randn([3, 4, 2, 2], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 500, 999]);
    let xt = tables.add_noise(&x0, &eps, &t);
    let v = tables.v_target(&x0, &eps, &t);
    // identities: x0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v
    let a = tables.sqrt_alpha.index_select(0, &t).view([3, 1, 1, 1]);
    let s = tables.sqrt_one_minus.index_select(0, &t).view([3, 1, 1, 1]);
    let x0_back = &a * &xt - &s * &v;
    let eps_back = &s * &xt + &a * &v;
    assert!((x0_back - &x0).abs().max().double_value(&[]) < 1e-5);
    assert!((eps_back - &eps).abs().max().double_value(&[]) < 1e-5);
    // min-SNR: weight 1 where snr ≤ γ, γ/snr above
    let w = tables.min_snr_weights(&t, 5.0, false);
    let snr0 = tables.snr.double_value(&[0]);
    assert!((w.double_value(&[0]) - 5.0 / snr0).abs() < 1e-6);
    assert!((w.double_value(&[2]) - 1.0).abs() < 1e-6);
    let l2 = per_sample_loss(&xt, &x0, None);
    assert_eq!(l2.size(), vec![3]);
    let huber = per_sample_loss(&xt, &x0, Some((&tables, &t)));
    assert!(
        bool::try_from(huber.le_tensor(&l2).all()).unwrap(),
        "huber ≤ l2 for c < 1"
    );
}

#[test]
fn lr_schedules_match_diffusers() {
    let r = reference();
    for name in [
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
    ] {
        let s = LrSchedule::parse(name).unwrap();
        for (step, want) in floats(&r["lr"][name]).into_iter().enumerate() {
            let got = s.lr(1e-4, step as u64, 100, 10);
            assert!(
                (got - want).abs() < 1e-12,
                "{name} step {step}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn adamw_and_clipping_match_torch() {
    let r = &reference()["adamw"];
    let shapes: Vec<Vec<i64>> = r["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect()
        })
        .collect();
    let mk = |v: &serde_json::Value, i: usize| {
        Tensor::from_slice(&floats(v).iter().map(|x| *x as f32).collect::<Vec<_>>())
            .view(shapes[i].as_slice())
    };
    let params: Vec<Tensor> = (0..2)
        .map(|i| mk(&r["p"][i], i).set_requires_grad(true))
        .collect();
    let mut opt = AdamW::new(
        params.iter().map(|p| p.shallow_clone()).collect(),
        0.9,
        0.999,
        1e-8,
        0.01,
    );
    for step in r["grads"].as_array().unwrap() {
        for (i, p) in params.iter().enumerate() {
            let mut g = p.grad();
            if !g.defined() {
                // create the gradient buffer once
                (p * 0.0).sum(Kind::Float).backward();
                g = p.grad();
            }
            g.copy_(&mk(&step[i], i));
        }
        opt.step(1e-3);
    }
    for (i, p) in params.iter().enumerate() {
        let want = mk(&r["after"][i], i);
        let d = (p.detach() - want).abs().max().double_value(&[]);
        assert!(d < 1e-6, "param {i}: {d}");
    }
    // clipping
    let ps: Vec<Tensor> = (0..2)
        .map(|i| mk(&r["p"][i], i).set_requires_grad(true))
        .collect();
    for (i, p) in ps.iter().enumerate() {
        (p * 0.0).sum(Kind::Float).backward();
        p.grad().copy_(&mk(&r["grads"][0][i], i));
    }
    let total = clip_grad_norm(&ps, 1.0);
    assert!((total.double_value(&[]) - r["clip_total_norm"].as_f64().unwrap()).abs() < 1e-4);
    for (i, p) in ps.iter().enumerate() {
        let d = (p.grad() - mk(&r["clipped"][i], i))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6, "clipped grad {i}: {d}");
    }
}
