//! `train.optimizer = "lion" | "prodigy" | "adafactor"` in real runs on the
//! tiny model: each trains (validation loss falls), names itself in
//! `ss_optimizer`, saves its own state and resumes bit-identically; a state
//! of one optimizer is refused by another with a message naming the key.
//! (Their maths against the reference packages: `tests/optimizers.rs`.)

mod common;
use lora_sdxl::train::{train, TrainOptions};
use lora_sdxl::JobConfig;
use lora_testkit::Tolerance;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Run name, optimizer, lr, optimizer_args, what `ss_optimizer` must say, a state key.
type Run<'a> = (
    &'a str,
    &'a str,
    f64,
    &'a [(&'a str, toml::Value)],
    &'a str,
    &'a str,
);

fn job(
    root: &Path,
    name: &str,
    optimizer: &str,
    lr: f64,
    args: &[(&str, toml::Value)],
) -> (JobConfig, PathBuf) {
    let (model, data) = (root.join("tiny.safetensors"), root.join("data"));
    let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
    c.save.save_every = 4;
    c.train.steps = 8;
    c.train.optimizer = optimizer.into();
    c.train.lr = lr;
    c.train.optimizer_args = args
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect::<BTreeMap<_, _>>();
    c.validation.images = Some(2);
    (c, path)
}

#[test]
fn lion_prodigy_and_adafactor_train_name_themselves_and_resume() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::tiny_model_and_dataset(root, 6);
    let fixed = [
        ("relative_step", false.into()),
        ("scale_parameter", false.into()),
    ];
    let runs: [Run; 4] = [
        (
            "lion",
            "lion",
            1e-3,
            &[],
            "lorakit.optim.Lion(",
            "lion.unet.0.m",
        ),
        (
            "prodigy",
            "prodigy",
            1.0,
            &[],
            "lorakit.optim.Prodigy(",
            "prodigy.d",
        ),
        (
            "adafactor",
            "adafactor",
            2e-3,
            &fixed,
            "relative_step=False",
            "adafactor.unet.0.row",
        ),
        (
            "adafactor_rel",
            "adafactor",
            2e-3,
            &[],
            "relative_step=True",
            "adafactor.unet.0.row",
        ),
    ];
    // Prodigy starts at d = 1e-6 and needs a few more steps to find its size.
    let steps = |optimizer: &str| if optimizer == "prodigy" { 16 } else { 8 };
    let mut finals = Vec::new();
    for (name, optimizer, lr, args, described, state_key) in runs {
        let (mut c, path) = job(root, name, optimizer, lr, args);
        c.train.steps = steps(optimizer);
        let r = train(&c, &path, &common::quiet()).unwrap();
        assert_eq!(r.step, c.train.steps);
        let v: Vec<f64> = r.val_losses.iter().map(|(_, v)| *v).collect();
        eprintln!("{name}: validation {v:?}");
        // Adafactor's relative step scales by the weights' RMS, which starts at
        // 0 for a LoRA's up matrices: its steps are ~1e-5 and the loss falls
        // slowly (kohya's SDXL recipe uses the fixed rate for this reason).
        // effect: each optimizer lowers the validation loss
        let fall = if name == "adafactor_rel" {
            0.9999
        } else {
            0.97
        };
        assert!(
            v[v.len() - 1] < v[0] * fall,
            "{name}: validation loss did not fall: {v:?}"
        );
        let lora = lora_core::load_lora(
            r.last_lora.as_ref().unwrap(),
            lora_core::UnknownKeys::Reject,
        )
        .unwrap();
        assert!(
            lora.metadata["ss_optimizer"].contains(described),
            "{name}: {}",
            lora.metadata["ss_optimizer"]
        );
        let state = lora_core::io::read_tensors(r.run_dir.join("state.safetensors")).unwrap();
        assert!(
            state.tensors.iter().any(|(k, _)| k == state_key),
            "{name}: state lacks {state_key}"
        );
        finals.push(common::sorted_tensors(r.last_lora.as_ref().unwrap()));
    }
    // Different optimizers give different LoRAs from the same seed and data.
    for (i, a) in finals.iter().enumerate() {
        for b in &finals[i + 1..] {
            let same = a.iter().zip(b).all(|((_, x), (_, y))| x.equal(y));
            assert!(!same, "two optimizers trained identical weights");
        }
    }

    // Prodigy: 8 steps, then --resume to 16, equals the straight run.
    let (mut c, path) = job(root, "prodigy_resumed", "prodigy", 1.0, &[]);
    c.train.steps = 8;
    train(&c, &path, &common::quiet()).unwrap();
    c.train.steps = 16;
    let resumed = TrainOptions {
        resume: true,
        ..common::quiet()
    };
    let r = train(&c, &path, &resumed).unwrap();
    let (a, b) = (
        common::sorted_tensors(r.last_lora.as_ref().unwrap()),
        &finals[1],
    );
    assert!(
        a.iter()
            .zip(b)
            .all(|((ka, x), (kb, y))| ka == kb && x.equal(y)),
        "a resumed prodigy run differs from the straight one"
    );

    // Another optimizer cannot take over a prodigy state.
    let (mut c, path) = job(root, "prodigy_resumed", "lion", 1e-4, &[]);
    c.train.steps = 20;
    let e = train(&c, &path, &resumed).unwrap_err().to_string();
    assert!(
        e.contains("prodigy") && e.contains("train.optimizer"),
        "{e}"
    );
}

/// 8-bit Lion in a run: rank 32 gives up matrices of 4096 elements and
/// more, whose momenta are 8-bit in the state; the run trains and says so.
/// (Its maths against bitsandbytes: `tests/optimizers.rs`.)
#[test]
fn lion8bit_trains_with_8bit_momenta() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::tiny_model_and_dataset(root, 6);
    let (mut c, path) = job(root, "lion8bit", "lion8bit", 1e-3, &[]);
    c.network.linear = 32;
    c.network.linear_alpha = 32.0;
    let r = train(&c, &path, &common::quiet()).unwrap();
    let v: Vec<f64> = r.val_losses.iter().map(|(_, v)| *v).collect();
    // effect: 8-bit Lion lowers the validation loss
    assert!(
        v[v.len() - 1] < v[0] * 0.97,
        "validation loss did not fall: {v:?}"
    );
    let meta = lora_core::io::read_tensors(r.last_lora.as_ref().unwrap())
        .unwrap()
        .metadata;
    assert!(
        meta["ss_optimizer"].contains("lorakit.optim.Lion8bit("),
        "{}",
        meta["ss_optimizer"]
    );
    let state = lora_core::io::read_tensors(r.run_dir.join("state.safetensors")).unwrap();
    let q8 = state
        .tensors
        .iter()
        .filter(|(k, t)| k.ends_with(".m_q") && t.kind() == tch::Kind::Uint8)
        .count();
    let f32 = state
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("lion.") && k.ends_with(".m"))
        .count();
    assert!(q8 > 0 && f32 > 0, "8-bit momenta {q8}, fp32 momenta {f32}");
}

#[test]
fn optimizer_settings_are_checked_when_the_job_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::tiny_model_and_dataset(root, 2);
    let check = |optimizer: &str, lr: f64, args: &[(&str, toml::Value)]| {
        let (c, path) = job(root, "check", optimizer, lr, args);
        c.validate(&path)
            .err()
            .map(|e| (e.field.clone(), e.to_string()))
    };
    let (field, msg) = check("prodigy", 1.0, &[("d_coeff", 2.0.into())]).unwrap();
    assert_eq!(field, "train.optimizer_args.d_coeff");
    assert!(msg.contains("d_coef"), "{msg}");
    let (field, msg) = check("adamw", 1.0, &[]).unwrap();
    assert_eq!(field, "train.lr");
    assert!(msg.contains("prodigy"), "{msg}");
    assert!(check("prodigy", 1.0, &[("safeguard_warmup", true.into())]).is_none());
    let (field, _) = check("adafactor", 1e-3, &[("relative_step", 1.into())]).unwrap();
    assert_eq!(field, "train.optimizer_args.relative_step");
}

/// The largest first AdamW step from up = 0 against the rate: lr·|g|/(|g| + ε)
/// falls short of lr by ε/|g| and fp32 rounding, 6.1e-11 at lr = 1e-4 (5.3e-11
/// with 2 threads, 6.1e-11 with 1 thread and AVX2-limited MKL/oneDNN/ATen).
/// The old bound 1e-6 is kept (margin 16 000): a ratio of 16 or 1 where the
/// other is due is off by 15 × lr.
const FIRST_STEP: Tolerance = Tolerance::new(6.1e-11, 16_000.0, "ε/|g| and fp32 rounding");

/// The same at 16 × 1e-4: 9.7e-10 (8.6e-10 with 2 threads); the old bound
/// 1e-5 is kept (margin 10 000).
const FIRST_STEP_PLUS: Tolerance = Tolerance::new(9.7e-10, 10_000.0, "ε/|g| and fp32 rounding");

/// The down matrices' distance beyond 2·lr (the most two first steps can
/// move them apart): the distance is 1.48e-4 in every configuration, so 0
/// beyond; the slack is two fp32 ulps of a down weight ≤ 0.25 (kaiming-
/// uniform, 1/√fan_in), margin 4 — the old `2e-4 + 1e-7`. The up matrices'
/// ratio on the downs would move them ~15 × lr apart.
const DOWN_SLACK: Tolerance = Tolerance::new(
    2.0 * f32::EPSILON as f64 / 8.0,
    4.0,
    "two fp32 ulps of a down weight",
);

#[test]
fn loraplus_gives_the_up_matrices_a_higher_rate() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::tiny_model_and_dataset(root, 2);
    // One AdamW step from up = 0 moves every element by the rate: lr · sign(g).
    let largest = |name: &str, ratio: Option<f64>, part: &str| {
        let (mut c, path) = job(root, name, "adamw", 1e-4, &[]);
        c.train.steps = 1;
        c.train.weight_decay = Some(0.0);
        c.train.loraplus_lr_ratio = ratio;
        let r = train(&c, &path, &common::quiet()).unwrap();
        let lora = lora_core::load_lora(
            r.last_lora.as_ref().unwrap(),
            lora_core::UnknownKeys::Reject,
        )
        .unwrap();
        let m = common::sorted_tensors(r.last_lora.as_ref().unwrap())
            .iter()
            .filter(|(k, _)| k.ends_with(part))
            .map(|(_, t)| t.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        (m, lora.metadata["ss_loraplus_lr_ratio"].clone())
    };
    let (up, md) = largest("plain", None, "lora_up.weight");
    FIRST_STEP.check("up matrices: largest move against lr", (up - 1e-4).abs());
    assert_eq!(md, "None");
    let (up, md) = largest("plus", Some(16.0), "lora_up.weight");
    FIRST_STEP_PLUS.check(
        "LoRA+ up matrices: largest move against 16 × lr",
        (up - 16e-4).abs(),
    );
    assert_eq!(md, "16.0");
    // The down matrices keep the base rate. Their gradient is 0 while up = 0,
    // so their first AdamW move (step 2) is ≤ lr per element in both runs
    // (from the same initial weights): they differ by at most 2 · lr, not 16×.
    let two_steps = |name: &str, ratio: Option<f64>| {
        let (mut c, path) = job(root, name, "adamw", 1e-4, &[]);
        c.train.steps = 2;
        c.train.weight_decay = Some(0.0);
        c.train.loraplus_lr_ratio = ratio;
        let r = train(&c, &path, &common::quiet()).unwrap();
        common::sorted_tensors(r.last_lora.as_ref().unwrap())
    };
    let (plain, plus) = (
        two_steps("down_plain", None),
        two_steps("down_plus", Some(16.0)),
    );
    let mut compared = 0;
    for ((k, x), (_, y)) in plain.iter().zip(&plus) {
        if k.ends_with("lora_down.weight") {
            let d = (x - y).abs().max().double_value(&[]);
            DOWN_SLACK.check(
                format!("{k}: down matrices apart, beyond 2·lr"),
                (d - 2e-4).max(0.0),
            );
            compared += 1;
        }
    }
    assert!(compared > 0);
    let (c, path) = {
        let (mut c, p) = job(root, "prodigy_plus", "prodigy", 1.0, &[]);
        c.train.loraplus_lr_ratio = Some(16.0);
        (c, p)
    };
    let e = c.validate(&path).unwrap_err();
    assert_eq!(e.field, "train.loraplus_lr_ratio");
}
