//! Noise schedule, LR schedules, AdamW and clipping against diffusers/torch
//! references (scripts/fixtures/training_math.py).

use lora_sdxl::train::optim::{clip_grad_norm, AdamW};
use lora_sdxl::train::schedule::{per_sample_loss, LrSchedule, NoiseSchedule, ScheduleTables};
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
    let tables = ScheduleTables::new(&NoiseSchedule::sdxl(false), Device::Cpu);
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
    let l2 = per_sample_loss(&xt, &x0, None, None);
    assert_eq!(l2.size(), vec![3]);
    let huber = per_sample_loss(&xt, &x0, Some((&tables, &t)), None);
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

#[test]
fn adamw8bit_matches_bitsandbytes() {
    use lora_sdxl::train::optim::{dynamic_map, QuantMap};
    let r: std::collections::HashMap<String, Tensor> = lora_core::io::read_tensors(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/adamw8bit.safetensors"
    ))
    .unwrap()
    .tensors
    .into_iter()
    .collect();
    let max_diff = |a: &Tensor, b: &Tensor| {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[])
    };
    // The quantisation maps are bitsandbytes' exactly.
    assert_eq!(max_diff(&dynamic_map(true), &r["qmap_signed"]), 0.0);
    assert_eq!(max_diff(&dynamic_map(false), &r["qmap_unsigned"]), 0.0);
    let params: Vec<Tensor> = ["big", "small"]
        .iter()
        .map(|n| r[&format!("p0_{n}")].copy().set_requires_grad(true))
        .collect();
    for p in &params {
        (p * 0.0).sum(Kind::Float).backward();
    }
    let mut opt = AdamW::new_8bit(
        params.iter().map(|p| p.shallow_clone()).collect(),
        0.9,
        0.999,
        1e-8,
        0.01,
    );
    for k in 0..6 {
        for (p, n) in params.iter().zip(["big", "small"]) {
            p.grad().copy_(&r[&format!("grad_{k}_{n}")]);
        }
        opt.step(1e-2);
        for (p, n) in params.iter().zip(["big", "small"]) {
            let want = &r[&format!("p{}_{n}", k + 1)];
            let d = max_diff(&p.detach(), want);
            // One update moves a weight by about lr = 1e-2; float rounding of
            // the dequantised moments stays far below that.
            assert!(d < 1e-6, "step {k} {n}: max |Δ| {d:.3e}");
        }
    }
    // The stored 8-bit codes and block absmax equal bitsandbytes' state.
    let state = opt.state_tensors("s");
    let get = |k: &str| &state.iter().find(|(n, _)| n == k).unwrap().1;
    let codes_equal = get("s.0.m_q")
        .eq_tensor(&r["state1_big"])
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(codes_equal > 0.999, "m codes agree on {:.4}", codes_equal);
    let codes_equal = get("s.0.v_q")
        .eq_tensor(&r["state2_big"])
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(codes_equal > 0.999, "v codes agree on {:.4}", codes_equal);
    for (ours, theirs) in [
        ("s.0.m_absmax", "absmax1_big"),
        ("s.0.v_absmax", "absmax2_big"),
    ] {
        let scale = r[theirs].abs().max().double_value(&[]);
        let d = max_diff(get(ours), &r[theirs]) / scale;
        assert!(d < 1e-6, "{ours}: relative Δ {d:.2e}");
    }
    // Small parameters keep fp32 moments.
    assert!(state.iter().any(|(n, _)| n == "s.1.m"));
    // Round trip: quantise ∘ dequantise keeps codes.
    let map = QuantMap::dynamic(true, Device::Cpu);
    let q = map.quantize(&r["grad_3_big"]);
    let again = map.quantize(&map.dequantize(&q));
    assert_eq!(max_diff(&q.codes, &again.codes), 0.0);
}

#[test]
fn optimizer_state_converts_between_fp32_and_8bit() {
    let p = Tensor::randn([64, 80], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (&p * 0.0).sum(Kind::Float).backward();
    let mut a = AdamW::new(vec![p.shallow_clone()], 0.9, 0.999, 1e-8, 0.0);
    for _ in 0..3 {
        p.grad()
            .copy_(&Tensor::randn([64, 80], (Kind::Float, Device::Cpu)));
        a.step(1e-3);
    }
    let saved: std::collections::HashMap<String, Tensor> =
        a.state_tensors("adam").into_iter().collect();
    let get = |k: &str| saved.get(k).map(|t| t.shallow_clone());
    // fp32 state into an 8-bit optimizer and back.
    let mut b = AdamW::new_8bit(vec![p.shallow_clone()], 0.9, 0.999, 1e-8, 0.0);
    b.load_state("adam", &get, 3).unwrap();
    assert_eq!(b.steps_taken(), 3);
    let q: std::collections::HashMap<String, Tensor> =
        b.state_tensors("adam").into_iter().collect();
    assert!(q.contains_key("adam.0.m_q") && q.contains_key("adam.0.v_absmax"));
    let getq = |k: &str| q.get(k).map(|t| t.shallow_clone());
    let mut c = AdamW::new(vec![p.shallow_clone()], 0.9, 0.999, 1e-8, 0.0);
    c.load_state("adam", &getq, 3).unwrap();
    let back: std::collections::HashMap<String, Tensor> =
        c.state_tensors("adam").into_iter().collect();
    let rel = (&back["adam.0.m"] - &saved["adam.0.m"])
        .abs()
        .max()
        .double_value(&[])
        / saved["adam.0.m"].abs().max().double_value(&[]);
    assert!(rel < 0.02, "8-bit round trip of m: {rel}");
    // A missing entry is named.
    let none = |_: &str| None;
    assert_eq!(c.load_state("adam", &none, 3).unwrap_err(), "adam.0.m_q");
}

/// `constant` with a warm-up runs the warm-up (as constant_with_warmup) and
/// says so; without a warm-up it stays constant.
#[test]
fn constant_schedule_with_warmup_warms_up() {
    let (s, note) = LrSchedule::for_job("constant", 10).unwrap();
    assert_eq!(s, LrSchedule::ConstantWithWarmup);
    assert!(note.unwrap().contains("warmup_steps = 10"));
    assert!(s.lr(1e-4, 0, 100, 10) < 1e-5);
    assert_eq!(s.lr(1e-4, 50, 100, 10), 1e-4);
    let (s, note) = LrSchedule::for_job("constant", 0).unwrap();
    assert_eq!((s, note), (LrSchedule::Constant, None));
    assert!(LrSchedule::for_job("nope", 0).is_none());
}
