//! The trainer's event stream and the settings it carries out: event order,
//! validation cadence, the stop flag, LoRA dropouts acting in training, and
//! `loss.csv` on resume. A tiny SDXL-architecture model and a synthetic
//! dataset, on CPU.

mod common;
use lora_sdxl::train::{train, train_with, Event, ObserveFn, Observers, TrainOptions};
use lora_sdxl::JobConfig;
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

/// Runs draw from torch's process-wide generator: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    job: JobConfig,
    path: PathBuf,
}

fn setup(steps: u64, save_every: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (model, data) = common::tiny_model_and_dataset(&root, 4);
    let (mut c, path) = common::template_job(&root, &model, &data);
    c.job.name = "run".into();
    c.job.device = Some("cpu".into());
    c.network.linear = 4;
    c.network.linear_alpha = 4.0;
    c.network.conv = 2;
    c.network.conv_alpha = 2.0;
    c.save.save_every = save_every;
    c.train.steps = steps;
    c.train.batch_size = 2;
    c.train.gradient_accumulation = 1;
    c.train.lr = 2e-3;
    c.train.dtype = "fp32".into();
    c.train.gradient_checkpointing = false.into();
    c.datasets[0].resolution = vec![256];
    c.validation.images = Some(1);
    Setup {
        _dir: dir,
        root,
        job: c,
        path,
    }
}

fn quiet() -> TrainOptions {
    TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// Trains and returns every event seen by an extra observer.
fn events_of(job: &JobConfig, path: &std::path::Path, opts: &TrainOptions) -> Vec<Event> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let observers: Observers = vec![Box::new(ObserveFn(move |e: &Event| {
        // a checkpoint's files are on disk when it is announced
        if let Event::Checkpoint { path, state, .. } = e {
            assert!(path.exists() && state.exists(), "{e:?}");
        }
        log.borrow_mut().push(e.clone());
    }))];
    train_with(job, path, opts, observers).unwrap();
    let v = seen.borrow().clone();
    v
}

#[test]
fn events_come_in_order_and_validation_follows_its_own_cadence() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup(7, 4);
    s.job.validation.every = Some(3);
    let ev = events_of(&s.job, &s.path, &quiet());
    // events.jsonl holds exactly the events, one JSON line each
    let lines = std::fs::read_to_string(s.root.join("output/run/events.jsonl")).unwrap();
    let expect: Vec<String> = ev
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    assert_eq!(lines.lines().collect::<Vec<_>>(), expect);
    assert!(expect.last().unwrap().contains(r#""event":"finished""#));
    assert!(
        matches!(
            ev[0],
            Event::Started {
                step: 0,
                total_steps: 7,
                resumed: false,
                ..
            }
        ),
        "{:?}",
        ev[0]
    );
    // the run says first what it computes on
    let Event::Started { notes, .. } = &ev[0] else {
        unreachable!()
    };
    let want = format!(
        "device cpu, dtype {}, attention SDPA (CPU kernels), libtorch 2.11.0",
        s.job.train.dtype
    );
    assert!(notes[0].starts_with(&want), "{notes:?}");
    // validation exactly at multiples of `every` and at the last step
    let val: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Validation { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(val, vec![0, 3, 6, 7]);
    // one Step per optimizer step, in order; the loss is read at saves only here
    let steps: Vec<(u64, bool)> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, loss, .. } => Some((*step, loss.is_some())),
            _ => None,
        })
        .collect();
    let expect: Vec<(u64, bool)> = (1..=7).map(|s| (s, s == 4 || s == 7)).collect();
    assert_eq!(steps, expect);
    // per step: Step, then Validation, then Checkpoint; the run ends with Finished
    let order: Vec<String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, .. } if [4, 6, 7].contains(step) => Some(format!("step{step}")),
            Event::Validation { step, .. } if *step > 0 => Some(format!("val{step}")),
            Event::Checkpoint { step, last, .. } => Some(format!("ckpt{step}{last}")),
            Event::Finished { step } => Some(format!("done{step}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "val3",
            "step4",
            "ckpt4false",
            "step6",
            "val6",
            "step7",
            "val7",
            "ckpt7true",
            "done7"
        ]
    );
    // the CSV observer wrote the validation of step 3 although no loss was logged there
    let csv = std::fs::read_to_string(s.root.join("output/run/loss.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("3,,,")), "{csv}");
    // the step-0 validation row says when it was measured (after loading)
    let secs0: f64 = csv
        .lines()
        .nth(1)
        .unwrap()
        .rsplit(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs0 > 0.0, "{csv}");
}

#[test]
fn the_stop_flag_ends_the_run_after_the_step_with_a_checkpoint() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(20, 100);
    let opts = quiet();
    let stop = opts.stop.clone();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    let observers: Observers = vec![Box::new(ObserveFn(move |e: &Event| {
        if let Event::Step { step: 2, .. } = e {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        log.borrow_mut().push(e.clone());
    }))];
    let r = train_with(&s.job, &s.path, &opts, observers).unwrap();
    assert!(r.interrupted);
    assert_eq!(r.step, 3);
    let ev = seen.borrow();
    assert!(
        matches!(ev.last(), Some(Event::Stopped { step: 3 })),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Checkpoint {
            step: 3,
            last: false,
            ..
        }
    )));
    assert!(!ev.iter().any(|e| matches!(e, Event::Finished { .. })));
}

/// Network dropouts set in the job act during training: the same seed gives
/// other weights with them than without.
#[test]
fn network_dropouts_change_what_is_trained() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let weights = |dropouts: bool| {
        let mut s = setup(2, 100);
        if dropouts {
            s.job.network.rank_dropout = 0.5;
            s.job.network.module_dropout = 0.3;
        }
        let r = train(&s.job, &s.path, &quiet()).unwrap();
        lora_core::io::read_tensors(r.last_lora.unwrap())
            .unwrap()
            .tensors
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (plain, dropped) = (weights(false), weights(true));
    // effect: a module trained differently moves by far more than 1e-7
    let differ = plain
        .iter()
        .filter(|(k, t)| {
            k.ends_with("lora_up.weight")
                && (*t - &dropped[*k]).abs().max().double_value(&[]) > 1e-7
        })
        .count();
    let ups = plain
        .keys()
        .filter(|k| k.ends_with("lora_up.weight"))
        .count();
    assert!(
        differ * 2 > ups,
        "only {differ} of {ups} modules trained differently with dropouts"
    );
}

/// `--resume` after a state older than the log: the rows written after that
/// state are dropped, so no step appears twice in `loss.csv`.
#[test]
fn loss_csv_has_each_step_once_after_a_resume() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(6, 4);
    let run_dir = s.root.join("output/run");
    let backup = s.root.join("state_at_4.safetensors");
    let keep = backup.clone();
    let observers: Observers = vec![Box::new(ObserveFn(move |e: &Event| {
        if let Event::Checkpoint { step: 4, state, .. } = e {
            std::fs::copy(state, &keep).unwrap();
        }
    }))];
    train_with(&s.job, &s.path, &quiet(), observers).unwrap();
    // as if the run had died after step 4's save: the state is step 4's, the log goes further
    std::fs::copy(&backup, run_dir.join("state.safetensors")).unwrap();
    let opts = TrainOptions {
        resume: true,
        ..quiet()
    };
    let r = train(&s.job, &s.path, &opts).unwrap();
    assert_eq!(r.step, 6);
    // events.jsonl keeps the first part and appends the resumed one
    let log = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap();
    let starts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(r#""event":"started""#))
        .collect();
    assert_eq!(starts.len(), 2, "{log}");
    assert!(starts[1].contains(r#""resumed":true"#) && starts[1].contains(r#""step":4"#));
    let csv = std::fs::read_to_string(run_dir.join("loss.csv")).unwrap();
    let steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1).is_some_and(|loss| !loss.is_empty()))
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps, vec![4, 6], "{csv}");
}

/// A loss that turns NaN stops the run with a message naming the step, and
/// no checkpoint of the broken weights is written.
#[test]
fn a_nan_loss_stops_the_run_before_saving() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(3, 1);
    // poison the base model's output conv: every prediction is NaN
    let model = s.job.model.name_or_path.clone();
    let st = lora_core::io::read_tensors(&model).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = st
        .tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k == "model.diffusion_model.out.2.bias" {
                t.full_like(f64::NAN)
            } else {
                t
            };
            (k, t)
        })
        .collect();
    std::fs::write(
        &model,
        lora_core::io::serialize(&tensors, &st.metadata).unwrap(),
    )
    .unwrap();
    let e = train(&s.job, &s.path, &quiet()).unwrap_err().to_string();
    assert!(e.contains("diverged") && e.contains("step 1"), "{e}");
    let run_dir = s.root.join("output/run");
    assert!(!run_dir.join("run_000000001.safetensors").exists());
    assert!(!run_dir.join("state.safetensors").exists());
}

/// Latents encoded in another VAE dtype are not reused: the cache key names
/// the dtype (a bf16 run after an fp32 one in the same folder encodes anew).
#[test]
fn the_latent_cache_is_keyed_by_the_vae_dtype() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup(1, 100);
    let cache = s.root.join("output/run/cache/latents");
    let count = || -> usize {
        std::fs::read_dir(&cache)
            .unwrap()
            .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum()
    };
    train(&s.job, &s.path, &quiet()).unwrap();
    let fp32 = count();
    assert!(fp32 > 0);
    s.job.train.dtype = "bf16".into();
    train(&s.job, &s.path, &quiet()).unwrap();
    assert_eq!(
        count(),
        2 * fp32,
        "bf16 latents must not reuse the fp32 entries"
    );
}

/// The saved file's metadata says what the run did, as kohya writes it.
#[test]
fn metadata_tells_the_truth() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup(2, 100);
    s.job.job.trigger_word = Some("zzz-trigger".into());
    s.job.train.optimizer = "adamw8bit".into();
    s.job.datasets[0].num_repeats = 3;
    // a second dataset with a kohya repeat folder `2_extra` of two images
    let extra = s.root.join("extra");
    let sub = extra.join("2_extra");
    std::fs::create_dir_all(&sub).unwrap();
    let data = s.job.datasets[0].folder_path.clone();
    let mut names: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    names.sort();
    for n in &names[..2] {
        std::fs::copy(data.join(n), sub.join(n)).unwrap();
        let cap = n.replace(".png", ".txt");
        std::fs::copy(data.join(&cap), sub.join(&cap)).unwrap();
    }
    let mut second = s.job.datasets[0].clone();
    second.folder_path = extra;
    second.num_repeats = 1;
    s.job.datasets.push(second);
    let r = train(&s.job, &s.path, &quiet()).unwrap();
    let md = lora_core::io::read_tensors(r.last_lora.unwrap())
        .unwrap()
        .metadata;
    assert!(
        md["ss_optimizer"].contains("AdamW8bit"),
        "{}",
        md["ss_optimizer"]
    );
    // images × repeats: 4 × 3 + 2 × 2 (the folder's own repeat count)
    assert_eq!(md["ss_num_train_images"], "16");
    let tags: serde_json::Value = serde_json::from_str(&md["ss_tag_frequency"]).unwrap();
    let keys: Vec<&String> = tags.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["2_extra", "3_data"], "{tags}");
    // the inserted trigger is counted, once per image
    assert_eq!(tags["3_data"]["zzz-trigger"], 4, "{tags}");
    assert_eq!(tags["2_extra"]["zzz-trigger"], 2, "{tags}");
    assert!(
        !md["ss_network_args"].contains("null"),
        "{}",
        md["ss_network_args"]
    );
    // two steps into the first epoch: the final save counts one epoch run
    assert_eq!(md["ss_steps"], "2");
    assert_eq!(md["ss_epoch"], "1");
}

/// Without the latent cache every batch is decoded: each exactly once, and
/// all but the first of each epoch on the prefetch thread while the step
/// before it ran.
#[test]
fn each_batch_is_decoded_once_and_ahead_of_its_step() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup(6, 100);
    s.job.train.cache_latents = false;
    let r = train(&s.job, &s.path, &quiet()).unwrap();
    // 4 images, batch 2: 2 batches an epoch, 6 steps = 3 epochs; validation
    // (1 image) at steps 0 and 6 is decoded in the step
    let d = r.decode;
    assert_eq!(d.wasted, 0, "{d:?}");
    assert_eq!(d.ahead, 3, "{d:?}");
    assert_eq!(d.in_step, 3 + 2, "{d:?}");
    assert_eq!(
        d.ahead + d.in_step,
        6 + 2,
        "every batch decoded once: {d:?}"
    );
}

/// `random_crop` with `cache_latents`: crops change every epoch, so those
/// latents are not cached (as kohya does) and the cache does not grow with
/// the epochs; only the centre-cropped validation image is cached.
#[test]
fn random_crops_do_not_grow_the_latent_cache() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup(8, 100);
    let wide = s.root.join("wide");
    lora_data::synthetic::write_character_dataset(&wide, 4, 400, 300, "myaku", 9).unwrap();
    s.job.datasets[0].folder_path = wide;
    s.job.datasets[0].random_crop = true;
    let r = train(&s.job, &s.path, &quiet()).unwrap();
    assert_eq!(r.step, 8); // 4 epochs of 2 batches
    let cache = s.root.join("output/run/cache/latents");
    let entries: usize = std::fs::read_dir(&cache)
        .map(|dirs| {
            dirs.map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
                .sum()
        })
        .unwrap_or(0);
    assert_eq!(entries, 1, "only the validation image's latents are cached");
    // every training batch decoded (its crop is new), the validation image once
    assert_eq!(r.decode.ahead + r.decode.in_step, 8 + 1, "{:?}", r.decode);
}

/// With in-training samples on, a step's loss and its validation loss still
/// share one `loss.csv` row (the samples rendered in between do not split it).
#[test]
fn samples_do_not_split_a_steps_log_row() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup(2, 2);
    s.job.sample.disable = false;
    s.job.sample.sample_every = 2;
    s.job.sample.prompts = vec!["[trigger], beach".into()];
    s.job.sample.sample_steps = 1;
    s.job.sample.width = 64;
    s.job.sample.height = 64;
    let ev = events_of(&s.job, &s.path, &quiet());
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Samples { step: 2, .. })));
    let csv = std::fs::read_to_string(s.root.join("output/run/loss.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().filter(|l| l.starts_with("2,")).collect();
    assert_eq!(rows.len(), 1, "{csv}");
    let cols: Vec<&str> = rows[0].split(',').collect();
    assert!(!cols[1].is_empty() && !cols[3].is_empty(), "{csv}");
}
