//! Settings the trainer resolves when a run starts, and their effect:
//! prediction type and zero-terminal-SNR schedule (job, diffusers scheduler
//! config or marker keys), and `gradient_checkpointing = "auto"`.

mod common;
use lora_sdxl::train::{train_with, Event, Observer, Observers, RunView, TrainOptions};
use lora_sdxl::JobConfig;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Runs draw from torch's process-wide generator: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn job_for(root: &Path, model: &Path, data: &Path) -> (JobConfig, PathBuf) {
    let (mut c, path) = common::template_job(root, model, data);
    c.job.device = Some("cpu".into());
    c.network.linear = 2;
    c.network.conv = 0;
    c.train.steps = 1;
    c.train.batch_size = 1;
    c.train.gradient_accumulation = 1;
    c.train.dtype = "fp32".into();
    c.datasets[0].resolution = vec![256];
    c.validation.images = Some(1);
    (c, path)
}

/// What a run said when it started, and the model's checkpointing then.
#[derive(Default)]
struct Start {
    notes: Vec<String>,
    checkpointing: Option<bool>,
    val0: Option<f64>,
}

struct Watch(Rc<RefCell<Start>>);

impl Observer for Watch {
    fn on_event(&mut self, e: &Event, run: &RunView<'_>) -> lora_sdxl::Result<()> {
        let mut s = self.0.borrow_mut();
        match e {
            Event::Started { notes, .. } => {
                s.notes = notes.clone();
                s.checkpointing = Some(run.model.unet.gradient_checkpointing());
            }
            Event::Validation { step: 0, loss, .. } => s.val0 = Some(*loss),
            _ => {}
        }
        Ok(())
    }
}

fn start_of(job: &JobConfig, path: &Path) -> Start {
    let seen = Rc::new(RefCell::new(Start::default()));
    let opts = TrainOptions {
        quiet: true,
        ..Default::default()
    };
    let observers: Observers = vec![Box::new(Watch(seen.clone()))];
    train_with(job, path, &opts, observers).unwrap();
    let s = std::mem::take(&mut *seen.borrow_mut());
    s
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The checkpoint `plain` with NoobAI-style `v_pred` and `ztsnr` marker
/// keys, beside it as `marked.safetensors`.
fn marked_copy(plain: &Path) -> PathBuf {
    let marked = plain.with_file_name("marked.safetensors");
    let st = lora_core::io::read_tensors(plain).unwrap();
    let mut tensors = st.tensors;
    tensors.push(("v_pred".into(), tch::Tensor::from_slice(&[0f32])));
    tensors.push(("ztsnr".into(), tch::Tensor::from_slice(&[0f32])));
    std::fs::write(
        &marked,
        lora_core::io::serialize(&tensors, &st.metadata).unwrap(),
    )
    .unwrap();
    marked
}

/// kohya's keys for the loss, zero-terminal SNR (as the run used it, here
/// from the checkpoint's marker), clipping, warm-up and caption dropout are
/// in the file and say what the run did (issue 28: they were missing).
#[test]
fn the_metadata_names_the_loss_the_schedule_and_the_clipping() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (plain, data) = common::tiny_model_and_dataset(dir.path(), 2);
    let marked = marked_copy(&plain);
    let metadata = |model: &Path, edit: &dyn Fn(&mut JobConfig)| {
        let (mut job, path) = job_for(dir.path(), model, &data);
        edit(&mut job);
        let r = lora_sdxl::train::train(&job, &path, &common::quiet()).unwrap();
        let file = r.last_lora.unwrap();
        let md = lora_core::io::read_tensors(&file).unwrap().metadata;
        std::fs::remove_dir_all(&r.run_dir).unwrap();
        md
    };
    let huber = metadata(&marked, &|j| {
        j.train.loss = "huber".into();
        j.train.max_grad_norm = 0.5;
        j.train.warmup_steps = 1;
        j.datasets[0].caption_dropout_rate = 0.25;
    });
    let want = [
        ("ss_loss_type", "huber"),
        ("ss_zero_terminal_snr", "True"),
        ("ss_huber_schedule", "snr"),
        ("ss_huber_c", "0.1"),
        ("ss_max_grad_norm", "0.5"),
        ("ss_lr_warmup_steps", "1"),
        ("ss_caption_dropout_rate", "0.25"),
    ];
    for (k, v) in want {
        assert_eq!(huber.get(k).map(String::as_str), Some(v), "{k}");
    }
    let l2 = metadata(&plain, &|_| {});
    assert_eq!(l2["ss_loss_type"], "l2");
    assert_eq!(l2["ss_zero_terminal_snr"], "False");
    assert!(!l2.contains_key("ss_huber_c"));
}

/// A diffusers folder's `scheduler/scheduler_config.json` declares
/// v-prediction and zero terminal SNR; without one, a folder is ε.
#[test]
fn a_folders_scheduler_config_sets_prediction_and_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_a_diffusers");
    let vpred = dir.path().join("vpred");
    copy_dir(&fixture, &vpred);
    std::fs::create_dir_all(vpred.join("scheduler")).unwrap();
    std::fs::write(
        vpred.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "rescale_betas_zero_snr": true}"#,
    )
    .unwrap();
    let m = lora_sdxl::SdxlModel::load(&vpred, tch::Kind::Float, tch::Device::Cpu).unwrap();
    assert_eq!(m.detected.prediction, lora_core::Prediction::V);
    assert!(m.detected.zero_terminal_snr);
    assert_eq!(
        m.detected.schedule_source,
        "scheduler/scheduler_config.json"
    );
    let plain = lora_sdxl::SdxlModel::load(&fixture, tch::Kind::Float, tch::Device::Cpu).unwrap();
    assert_eq!(plain.detected.prediction, lora_core::Prediction::Epsilon);
    assert!(!plain.detected.zero_terminal_snr);
}

/// The checkpoint's markers set the objective unless the job says otherwise
/// (`model.zero_terminal_snr = false` overrides a `ztsnr` marker); the
/// run's notes say which and from where, and the validation loss shows the
/// objective really changed.
#[test]
fn the_job_overrides_the_checkpoints_prediction_and_schedule() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (plain, data) = common::tiny_model_and_dataset(dir.path(), 2);
    let marked = marked_copy(&plain);

    let (mut job, path) = job_for(dir.path(), &marked, &data);
    let markers = start_of(&job, &path);
    // notes[0] says what the run computes on; the objective comes next
    assert!(
        markers.notes[1]
            .contains("v prediction (from the checkpoint's v_pred / ztsnr marker keys)")
            && markers.notes[1].contains("zero terminal SNR on"),
        "{:?}",
        markers.notes
    );
    job.model.zero_terminal_snr = Some(false);
    let overridden = start_of(&job, &path);
    assert!(
        overridden.notes[1].contains("zero terminal SNR off (from the job)"),
        "{:?}",
        overridden.notes
    );
    // the same objective set in the job on the unmarked file
    let (mut job, path) = job_for(dir.path(), &plain, &data);
    let default = start_of(&job, &path);
    assert!(
        default.notes[1].contains("epsilon prediction (from the SDXL default"),
        "{:?}",
        default.notes
    );
    job.model.prediction = Some("v_prediction".into());
    let v_in_job = start_of(&job, &path);
    let v = |s: &Start| s.val0.unwrap();
    // Same weights, data, seed and objective: the same operations on the
    // same values in one process, so the same bits (0 measured with 2
    // threads, 1 thread and AVX2-limited MKL/oneDNN/ATen).
    assert_eq!(v(&overridden), v(&v_in_job), "same objective, same loss");
    // effects: ztsnr and v-prediction each change the loss
    assert!(
        (v(&markers) - v(&overridden)).abs() > 1e-6,
        "ztsnr had no effect"
    );
    assert!(
        (v(&v_in_job) - v(&default)).abs() > 1e-6,
        "v-prediction had no effect"
    );
}

/// `gradient_checkpointing = "auto"` (the default) is off on CPU and says
/// why; `true` turns it on.
#[test]
fn auto_gradient_checkpointing_is_off_on_cpu_and_says_why() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = common::tiny_model_and_dataset(dir.path(), 2);
    let (mut job, path) = job_for(dir.path(), &model, &data);
    assert_eq!(job.train.gradient_checkpointing, Default::default()); // "auto" in the template
    let auto = start_of(&job, &path);
    assert_eq!(auto.checkpointing, Some(false));
    assert!(
        auto.notes
            .iter()
            .any(|n| n.contains("gradient checkpointing off") && n.contains("\"auto\": off on CPU")),
        "{:?}",
        auto.notes
    );
    job.train.gradient_checkpointing = true.into();
    let on = start_of(&job, &path);
    assert_eq!(on.checkpointing, Some(true));
    assert!(on
        .notes
        .iter()
        .any(|n| n.contains("gradient checkpointing on (train.gradient_checkpointing = true)")));
}

/// `train.vram` fills the memory settings the job file leaves unset and the
/// run uses them: on the CPU, "auto" checkpointing is off and the optimizer
/// AdamW, but "8gb" turns checkpointing on and trains with 8-bit AdamW; a
/// key the file sets wins; a batch over the preset's cap is refused.
#[test]
fn a_vram_preset_fills_what_the_job_leaves_unset() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = common::tiny_model_and_dataset(dir.path(), 2);
    let (job, path) = job_for(dir.path(), &model, &data);
    // the job as a file, without the keys the preset fills
    let mut value = toml::Value::try_from(&job).unwrap();
    let train = value.get_mut("train").unwrap().as_table_mut().unwrap();
    for k in ["optimizer", "gradient_checkpointing", "cache_latents"] {
        train.remove(k);
    }
    train.insert("vram".into(), "8gb".into());
    let write = |v: &toml::Value| std::fs::write(&path, toml::to_string(v).unwrap()).unwrap();
    write(&value);
    let preset = JobConfig::load(&path).unwrap();
    assert_eq!(preset.train.optimizer, "adamw8bit");
    let start = start_of(&preset, &path);
    assert_eq!(start.checkpointing, Some(true), "{:?}", start.notes);
    assert!(
        start
            .notes
            .iter()
            .any(|n| n.starts_with("train.vram = \"8gb\"")),
        "{:?}",
        start.notes
    );
    let run_dir = preset.job.output_dir.join(&preset.job.name);
    let file = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "safetensors") && !p.ends_with("state.safetensors")
        })
        .unwrap();
    let md = lora_core::io::read_tensors(&file).unwrap().metadata;
    assert!(
        md["ss_optimizer"].to_lowercase().contains("8bit"),
        "{}",
        md["ss_optimizer"]
    );
    // what the file sets wins
    let train = value.get_mut("train").unwrap().as_table_mut().unwrap();
    train.insert("optimizer".into(), "lion".into());
    train.insert("gradient_checkpointing".into(), false.into());
    write(&value);
    let explicit = JobConfig::load(&path).unwrap();
    assert_eq!(explicit.train.optimizer, "lion");
    assert_eq!(explicit.train.gradient_checkpointing, false.into());
    // batch 2 at 1024 px is over 8gb's 1 × 1024²
    let mut big = explicit.clone();
    big.train.batch_size = 2;
    big.datasets[0].resolution = vec![512, 1024];
    let e = big.validate(&path).unwrap_err();
    assert_eq!(e.field, "train.batch_size", "{e}");
    big.datasets[0].resolution = vec![512, 640]; // 2 × 640² < 1024²
    big.validate(&path).unwrap();
    // an unknown preset names the key
    let train = value.get_mut("train").unwrap().as_table_mut().unwrap();
    train.insert("vram".into(), "6gb".into());
    write(&value);
    let e = JobConfig::load(&path).unwrap_err();
    assert!(
        e.field == "train.vram" && e.message.contains("\"8gb\""),
        "{e}"
    );
}

/// `train.lr_scheduler_num_cycles` reaches the run's optimizer: with two
/// cycles over 4 steps the rate restarts at the full rate, where one cycle
/// keeps falling (the schedule's values are checked against diffusers in
/// `training_math.rs`; this checks the wiring).
#[test]
fn restarts_reach_the_optimizer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = common::tiny_model_and_dataset(dir.path(), 2);
    let rates = |cycles: u32| {
        let (mut job, path) = job_for(dir.path(), &model, &data);
        job.job.name = format!("cycles{cycles}");
        job.train.steps = 4;
        job.save.save_every = 4;
        job.train.lr_scheduler = "cosine_with_restarts".into();
        job.train.lr_scheduler_num_cycles = cycles;
        let mut lrs = Vec::new();
        let see = |e: &Event| {
            if let Event::Step { lr, .. } = e {
                lrs.push(*lr);
            }
        };
        let observers: Observers = vec![Box::new(lora_sdxl::train::ObserveFn(see))];
        train_with(&job, &path, &common::quiet(), observers).unwrap();
        lrs
    };
    let (one, two) = (rates(1), rates(2));
    let base = JobConfig::default().train.lr;
    // the rate of step 3 (0-based 2): half-way, so one cycle is at half
    // the rate and the second of two cycles starts again at the full rate
    assert_eq!(two[2], base, "{two:?}");
    assert!(one[2] < 0.6 * base, "{one:?}");
}
