//! Output preservation in real runs (issue 30): with differential output
//! preservation the LoRA's prediction for the class caption (no trigger)
//! stays closer to the base model's than without it, over several seeds;
//! blank prompt preservation does the same for the empty caption; the
//! preservation term is reported beside the loss and the settings are in
//! the file's metadata. The step's exact objective is checked by hand in
//! `src/train/preservation.rs`.

mod common;
use lora_core::{load_lora, UnknownKeys};
use lora_sdxl::model::captions::encode_captions;
use lora_sdxl::model::conditioning::time_ids;
use lora_sdxl::model::unet::vector_conditioning;
use lora_sdxl::train::{train_with, Event, ObserveFn};
use lora_sdxl::{ClipTokenizer, JobConfig, SdxlModel};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// torch's generator is global to the process, and training and the tiny
/// model's writer reseed it: the tests take turns, so their figures do not
/// depend on the test threads' interleaving.
static SERIAL: Mutex<()> = Mutex::new(());

/// Mean squared distance between the predictions of the base model with
/// and without `lora` for `prompt`: a fixed 16×16 latent at timesteps 200,
/// 500 and 800.
fn distance_from_base(model: &Path, lora: &Path, prompt: &str) -> f64 {
    let m = SdxlModel::load(model, Kind::Float, Device::Cpu).unwrap();
    let tok = ClipTokenizer::new();
    tch::no_grad(|| {
        let prompt = [prompt.to_string()];
        let cond = encode_captions(&tok, &m.te1, &m.te2, &prompt, 75).unwrap();
        let ids = time_ids((128, 128), (0, 0), (128, 128), Device::Cpu);
        let y = vector_conditioning(&cond.pooled, &ids);
        tch::manual_seed(1234);
        let x = Tensor::randn([1, 4, 16, 16], (Kind::Float, Device::Cpu));
        let predict = || {
            let p: Vec<Tensor> = [200.0, 500.0, 800.0]
                .iter()
                .map(|t| {
                    m.unet
                        .forward(&x, &Tensor::from_slice(&[*t as f32]), &cond.context, &y)
                })
                .collect();
            Tensor::cat(&p, 0)
        };
        let base = predict();
        m.attach_lora(load_lora(lora, UnknownKeys::Reject).unwrap().set, 1.0)
            .unwrap();
        (predict() - base)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    })
}

struct Trained {
    lora: PathBuf,
    /// `(step, loss, preservation)` of the steps with a loss.
    losses: Vec<(u64, f64, Option<f64>)>,
    /// Seconds in training steps (validation and saves excluded).
    train_seconds: f64,
}

/// 12 steps at a high rate on the tiny model (4 images at 128 px, trigger
/// `myaku`),
/// seed `seed`, with `edit` applied.
fn train(root: &Path, name: &str, seed: u64, edit: impl Fn(&mut JobConfig)) -> Trained {
    let model = root.join("tiny.safetensors");
    let data = root.join("data");
    let (mut c, path) = common::small_cpu_job(root, &model, &data, name);
    (c.train.steps, c.train.lr, c.network.conv) = (12, 5e-3, 0);
    c.datasets[0].resolution = vec![128];
    c.save.save_every = 12;
    c.job.seed = seed;
    edit(&mut c);
    let mut losses = Vec::new();
    let mut train_seconds = 0.0;
    let see = ObserveFn(|e: &Event| {
        if let Event::Step {
            step,
            loss,
            preservation,
            train_seconds: s,
            ..
        } = e
        {
            losses.extend(loss.map(|l| (*step, l, *preservation)));
            train_seconds = *s;
        }
    });
    let r = train_with(&c, &path, &common::quiet(), vec![Box::new(see)]).unwrap();
    Trained {
        lora: r.last_lora.unwrap(),
        losses,
        train_seconds,
    }
}

fn dop(c: &mut JobConfig) {
    c.train.diff_output_preservation = true;
    c.train.diff_output_preservation_class = Some("creature".into());
}

/// The first training caption with the trigger replaced by the class.
fn class_caption(root: &Path) -> (String, String) {
    let with = std::fs::read_to_string(root.join("data/char_000.txt")).unwrap();
    (with.replace("myaku", "creature"), with)
}

/// The LoRA's distance from the base for the class caption, DOP over
/// plain, after 12 steps at lr 5e-3: measured 0.12-0.21 over 3 seeds,
/// asserted below 0.5 for each; the trigger caption's distance falls at
/// least 1.8× less (measured 2.8-4.6×).
#[test]
fn dop_keeps_the_class_prompt_near_the_base() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, _) = common::tiny_model_and_dataset(root, 4);
    let (class, trigger) = class_caption(root);
    let mut ratios = Vec::new();
    let mut selectivity = Vec::new();
    for seed in [1, 2, 3] {
        let plain = train(root, &format!("plain{seed}"), seed, |_| {});
        let kept = train(root, &format!("dop{seed}"), seed, dop);
        let d = |t: &Trained, p: &str| distance_from_base(&model, &t.lora, p);
        let (plain_class, kept_class) = (d(&plain, &class), d(&kept, &class));
        let (plain_trig, kept_trig) = (d(&plain, &trigger), d(&kept, &trigger));
        eprintln!(
            "seed {seed}: class caption {plain_class:.3e} → {kept_class:.3e} ({:.3}), trigger caption {plain_trig:.3e} → {kept_trig:.3e} ({:.3})",
            kept_class / plain_class,
            kept_trig / plain_trig
        );
        ratios.push(kept_class / plain_class);
        selectivity.push((kept_trig / plain_trig) / (kept_class / plain_class));
        // the term is reported beside the loss, only with preservation
        assert!(plain.losses.iter().all(|(_, _, p)| p.is_none()));
        assert_eq!(kept.losses.len(), 2, "{:?}", kept.losses);
        assert!(kept
            .losses
            .iter()
            .all(|(_, _, p)| p.is_some_and(|p| p > 0.0)));
    }
    // measured (seeds 1, 2, 3): 0.208, 0.147, 0.118. Without the prior
    // pass's switch or without the term, DOP trains what plain training
    // does (ratio 1).
    let worst = ratios.iter().cloned().fold(0.0, f64::max);
    assert!(worst < 0.5, "DOP/plain distances {ratios:?}");
    // and it is selective: the trigger caption's distance fell far less
    // (0.61, 0.68, 0.34 of plain's; the character is still learned), so
    // the trigger's ratio over the class's is 2.9, 4.6, 2.8. Preserving the
    // captions with the trigger kept (the class not substituted) holds both
    // alike: 1.13, 1.13 (seeds 1, 2).
    let least = selectivity.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(least > 1.8, "trigger ratio / class ratio {selectivity:?}");
}

/// Blank prompt preservation acts (a different LoRA than plain training)
/// and holds the *empty* caption's prediction to the base's.
#[test]
fn blank_prompt_preservation_holds_the_empty_caption() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, _) = common::tiny_model_and_dataset(root, 4);
    let plain = train(root, "plain", 1, |_| {});
    let blank = train(root, "blank", 1, |c| {
        c.train.blank_prompt_preservation = true
    });
    let d = |t: &Trained| distance_from_base(&model, &t.lora, "");
    let (plain_d, blank_d) = (d(&plain), d(&blank));
    eprintln!(
        "empty caption: {plain_d:.3e} → {blank_d:.3e} ({:.3})",
        blank_d / plain_d
    );
    assert!(blank_d < 0.5 * plain_d);
    let l = load_lora(&blank.lora, UnknownKeys::Reject).unwrap();
    assert_eq!(l.metadata["lorakit.blank_prompt_preservation"], "True");
    assert_eq!(
        l.metadata["lorakit.blank_prompt_preservation_multiplier"],
        "1.0"
    );
    assert_eq!(l.metadata["lorakit.diff_output_preservation"], "False");
}

/// The refusals name the field (through the whole validation).
#[test]
fn validation_refuses_what_cannot_act() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (model, data) = common::tiny_model_and_dataset(root, 1);
    let (base, path) = common::small_cpu_job(root, &model, &data, "v");
    let refused = |edit: &dyn Fn(&mut JobConfig)| {
        let mut c = base.clone();
        edit(&mut c);
        c.validate(&path).unwrap_err().field
    };
    assert_eq!(
        refused(&|c| c.train.diff_output_preservation = true),
        "train.diff_output_preservation_class"
    );
    assert_eq!(
        refused(&|c| {
            dop(c);
            c.job.trigger_word = None;
        }),
        "job.trigger_word"
    );
    assert_eq!(
        refused(&|c| {
            dop(c);
            c.train.train_text_encoder = true;
        }),
        "train.train_text_encoder"
    );
    assert_eq!(
        refused(&|c| {
            dop(c);
            c.train.blank_prompt_preservation = true;
        }),
        "train.blank_prompt_preservation"
    );
    let mut ok = base.clone();
    dop(&mut ok);
    ok.train.cache_text_embeddings = true;
    ok.datasets[0].caption_dropout_rate = 0.0;
    assert!(
        ok.validate(&path).is_ok(),
        "DOP works with cached text embeddings"
    );
    // the template lists the keys with their help
    let t = JobConfig::template(None, None, None, None);
    for key in [
        "diff_output_preservation = false",
        "# diff_output_preservation_class = \"person\"",
        "diff_output_preservation_multiplier = 1.0",
        "blank_prompt_preservation = false",
    ] {
        assert!(t.contains(key), "{key} not in the template");
    }
}

/// The step-time cost of output preservation on the tiny model on CPU
/// (batch 2 at 256 px, 30 steps each): `cargo test -p lora-sdxl --test
/// preservation -- --ignored --nocapture`. Not a quality gate (timings).
#[test]
#[ignore]
fn step_time_cost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    common::tiny_model_and_dataset(root, 4);
    let long = |c: &mut JobConfig| {
        (c.train.steps, c.save.save_every) = (30, 30);
        c.datasets[0].resolution = vec![256];
    };
    let plain = train(root, "plain", 1, long);
    let kept = train(root, "dop", 1, |c| {
        long(c);
        dop(c);
    });
    let blank = train(root, "blank", 1, |c| {
        long(c);
        c.train.blank_prompt_preservation = true;
    });
    let per = |t: &Trained| t.train_seconds / 30.0;
    eprintln!(
        "s/step: plain {:.3}, dop {:.3} ({:.2}x), blank {:.3} ({:.2}x)",
        per(&plain),
        per(&kept),
        per(&kept) / per(&plain),
        per(&blank),
        per(&blank) / per(&plain)
    );
}
