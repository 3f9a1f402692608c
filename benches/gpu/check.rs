//! lorakit's side of the GPU check (`scripts/gpu-check.sh`, issue 16). Built
//! here by `scripts/gpu-build.sh` (`cargo bench --bench gpu_check --no-run`),
//! carried to the GPU machine and run there; every mode prints one JSON object
//! on stdout.
//!
//! ```text
//! gpu_check version                    what `lorakit --version` says (libtorch, CUDA, cuDNN, SDPA)
//! gpu_check correctness DEVICE          tiny SDXL: outputs and LoRA gradients on DEVICE vs CPU fp32
//! gpu_check write-model PATH            a full-size SDXL checkpoint of pattern weights (~6.9 GB)
//! gpu_check write-tiny PATH             a tiny random one (SdxlConfig::tiny, for the dry run)
//! gpu_check train MODEL DEVICE RES BATCH CKPT STEPS WORKDIR [VRAM]
//!                                       the real trainer (train_with) on a generated dataset:
//!                                       s/step, samples/s, peak CUDA memory, MFU; with VRAM, the
//!                                       job names that train.vram preset instead of CKPT
//! gpu_check sample MODEL DEVICE RES STEPS
//!                                       txt2img (CFG 7, Euler) after loading: seconds per image
//! ```
//!
//! Under `cargo test --all-targets` (no arguments) it only says how to use it.

#[path = "../common/mod.rs"]
mod common;

use lorakit::sdxl::train::{train_with, Event, ObserveFn, Observers, TrainOptions};
use lorakit::sdxl::{device, JobConfig, SdxlModel, TargetScope};
use lorakit::tch::{self, Device, Kind, Tensor};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

type AnyResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = match args.first().map(String::as_str) {
        Some("version") => Ok(json!({"lorakit": device::DeviceInfo::query().summary()})),
        Some("correctness") => correctness(&args[1..]),
        Some("write-model") => {
            common::write_full_size(Path::new(&args[1]));
            Ok(json!({"written": args[1]}))
        }
        Some("write-tiny") => lorakit::sdxl::synthetic::write_random_checkpoint(
            Path::new(&args[1]),
            &lorakit::sdxl::SdxlConfig::tiny(),
            3,
            Kind::Float,
        )
        .map(|_| json!({"written": args[1]}))
        .map_err(Into::into),
        Some("train") => train(&args[1..]),
        Some("sample") => sample(&args[1..]),
        _ => {
            println!("gpu_check: run by scripts/gpu-check.sh (see benches/gpu/check.rs)");
            return;
        }
    };
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("gpu_check: {e}");
            std::process::exit(1);
        }
    }
}

fn device_of(name: &str) -> AnyResult<Device> {
    Ok(lorakit::sdxl::resolve_device(Some(name))?)
}

/// max |a − b| / std(b), both read as fp32 on the CPU.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_device(Device::Cpu).to_kind(Kind::Float),
        b.to_device(Device::Cpu).to_kind(Kind::Float),
    );
    let d = (&a - &b).abs().max().double_value(&[]);
    d / b.std(true).double_value(&[]).max(1e-12)
}

fn fixture(name: &str) -> PathBuf {
    common::root()
        .join("crates/lora-sdxl/tests/fixtures")
        .join(name)
}

/// The tiny fixture's inputs on `device`.
fn io_on(device: Device) -> AnyResult<HashMap<String, Tensor>> {
    let io = lorakit::core::io::read_tensors(fixture("tiny_a_io.safetensors"))?;
    Ok(io
        .tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect())
}

/// Text encoders, UNet and VAE of one model on fixed inputs.
fn outputs(m: &SdxlModel, io: &HashMap<String, Tensor>, kind: Kind) -> Vec<(&'static str, Tensor)> {
    tch::no_grad(|| {
        let o1 = m.te1.forward(&io["input_ids_1"]);
        let o2 = m.te2.forward(&io["input_ids_2"]);
        let ctx = Tensor::cat(&[&o1.penultimate, &o2.penultimate], -1);
        let y = lorakit::sdxl::model::unet::vector_conditioning(&o2.pooled, &io["time_ids"]);
        let x = io["latents"].to_kind(kind);
        let eps = m.unet.forward(&x, &io["timesteps"], &ctx, &y);
        let pixels = m.vae.decode(&x);
        let (mean, _) = m.vae.encode_moments(&pixels);
        vec![
            ("te1_penultimate", o1.penultimate),
            ("te2_pooled", o2.pooled),
            ("unet_eps", eps),
            ("vae_decode", pixels),
            ("vae_encode_mean", mean),
        ]
    })
}

/// Identical LoRAs (seeded on the CPU: rank 4, up ~ N(0, 0.01²)) on every
/// UNet and text-encoder target of `m`, as leaves on `device`; returns them.
fn attach_lora(m: &SdxlModel, device: Device) -> AnyResult<Vec<(String, Tensor, Tensor)>> {
    tch::manual_seed(5);
    let mut set =
        lorakit::sdxl::synthetic::random_lora(&m.detected.config, TargetScope::ALL, 4, 4, 0.01)?;
    let mut leaves = Vec::new();
    for (key, a) in set.iter_mut() {
        let leaf = |t: Option<&Tensor>| t.map(|t| t.to_device(device).set_requires_grad(true));
        let (down, up) = (
            leaf(a.down()).ok_or("no down")?,
            leaf(a.up()).ok_or("no up")?,
        );
        a.set_weights(down.shallow_clone(), up.shallow_clone())?;
        leaves.push((key.to_string(), down, up));
    }
    m.attach_lora(set, 1.0)?;
    Ok(leaves)
}

/// The LoRA gradients of one loss (prediction vs latents) on `m`.
fn lora_grads(m: &SdxlModel, io: &HashMap<String, Tensor>, device: Device) -> AnyResult<Tensor> {
    let leaves = attach_lora(m, device)?;
    m.slots.set_training(true);
    let o1 = m.te1.forward(&io["input_ids_1"]);
    let o2 = m.te2.forward(&io["input_ids_2"]);
    let ctx = Tensor::cat(&[&o1.penultimate, &o2.penultimate], -1);
    let y = lorakit::sdxl::model::unet::vector_conditioning(&o2.pooled, &io["time_ids"]);
    let eps = m.unet.forward(&io["latents"], &io["timesteps"], &ctx, &y);
    (eps - &io["latents"])
        .pow_tensor_scalar(2)
        .mean(Kind::Float)
        .backward();
    m.slots.set_training(false);
    let grads: Vec<Tensor> = leaves
        .iter()
        .flat_map(|(_, d, u)| [d.grad(), u.grad()])
        .filter(Tensor::defined)
        .map(|g| g.flatten(0, -1).to_device(Device::Cpu))
        .collect();
    m.detach_loras();
    Ok(Tensor::cat(&grads, 0))
}

/// Every output and the LoRA gradients on `DEVICE` (fp32 and bf16) against
/// the CPU in fp32, as max |Δ| / std of the CPU value.
fn correctness(args: &[String]) -> AnyResult<Value> {
    let dev = device_of(args.first().map(String::as_str).unwrap_or("cuda"))?;
    let path = fixture("tiny_a.safetensors");
    let cpu = SdxlModel::load(&path, Kind::Float, Device::Cpu)?;
    let io_cpu = io_on(Device::Cpu)?;
    let reference = outputs(&cpu, &io_cpu, Kind::Float);
    let grads_cpu = lora_grads(&cpu, &io_cpu, Device::Cpu)?;
    let mut report = serde_json::Map::new();
    for kind in [Kind::Float, Kind::BFloat16] {
        let m = SdxlModel::load(&path, kind, dev)?;
        let io = io_on(dev)?;
        let mut r = serde_json::Map::new();
        for ((name, want), (_, got)) in reference.iter().zip(outputs(&m, &io, kind)) {
            r.insert(name.to_string(), json!(rel(&got, want)));
        }
        if kind == Kind::Float {
            r.insert(
                "lora_grads".into(),
                json!(rel(&lora_grads(&m, &io, dev)?, &grads_cpu)),
            );
        }
        report.insert(
            if kind == Kind::Float { "fp32" } else { "bf16" }.into(),
            Value::Object(r),
        );
    }
    report.insert("device".into(), json!(format!("{dev:?}")));
    Ok(Value::Object(report))
}

/// Model FLOPs of one LoRA training sample at a square resolution (SDXL
/// UNet forward + activation-gradient backward; recomputation not counted),
/// from `shared/reference/perf-and-tch.md` §2.
fn train_tflop_per_sample(res: i64) -> Option<f64> {
    match res {
        512 => Some(3.2),
        768 => Some(7.5),
        1024 => Some(14.3),
        _ => None,
    }
}

/// Writes `n` flat-coloured images with captions at `res`² into `dir`.
fn write_dataset(dir: &Path, n: u32, res: u32) -> AnyResult {
    std::fs::create_dir_all(dir)?;
    for i in 0..n {
        let img = image::RgbImage::from_fn(res, res, |x, y| {
            image::Rgb([(x * 255 / res) as u8, (y * 255 / res) as u8, (i * 40) as u8])
        });
        img.save(dir.join(format!("{i}.png")))?;
        std::fs::write(
            dir.join(format!("{i}.txt")),
            format!("gpucheck, picture {i}, gradient"),
        )?;
    }
    Ok(())
}

/// One run of the real trainer: UNet LoRA rank 16 / conv 8, AdamW, cached
/// latents and text embeddings, batch `BATCH` at `RES`², gradient
/// checkpointing `CKPT` (on/off). The first 3 steps (which fill the caches)
/// are not timed; the peak CUDA memory is that of the timed steps.
fn train(args: &[String]) -> AnyResult<Value> {
    let (preset, args) = match args {
        [rest @ .., p] if args.len() == 8 => (Some(p.as_str()), rest),
        _ => (None, args),
    };
    let [model, dev, res, batch, ckpt, steps, work] = args else {
        return Err("train MODEL DEVICE RES BATCH CKPT STEPS WORKDIR [VRAM]".into());
    };
    let (res, batch, steps): (u32, u32, u64) = (res.parse()?, batch.parse()?, steps.parse()?);
    let model = std::fs::canonicalize(model)?;
    let model = model.to_str().ok_or("model path is not UTF-8")?;
    let work = PathBuf::from(work);
    let data = work.join(format!("data{res}"));
    if !data.exists() {
        write_dataset(&data, 2 * batch, res)?;
    }
    let job_path = work.join(format!("job_{res}_{batch}_{ckpt}.toml"));
    std::fs::write(
        &job_path,
        JobConfig::template(Some(model), data.to_str(), Some("gpucheck"), None),
    )?;
    let mut job = JobConfig::load(&job_path)?;
    job.job.name = format!("run_{res}_{batch}_{ckpt}");
    job.job.output_dir = work.join("runs");
    job.job.device = Some(dev.clone());
    job.network.linear = 16;
    job.network.conv = 8;
    job.train.batch_size = batch as usize;
    job.train.gradient_accumulation = 1;
    job.train.steps = steps;
    job.train.cache_text_embeddings = true;
    job.train.gradient_checkpointing = (ckpt == "on").into();
    job.save.save_every = steps + 1;
    job.sample.disable = true;
    let d = &mut job.datasets[0];
    d.resolution = vec![res];
    (d.caption_dropout_rate, d.tag_dropout_rate, d.shuffle_tokens) = (0.0, 0.0, false);
    job.validation.images = Some(1);
    job.validation.every = Some(steps + 1);
    if let Some(p) = preset {
        // as a user writes it: the preset fills the memory keys left out
        let mut v = toml::Value::try_from(&job)?;
        let t = v
            .get_mut("train")
            .and_then(|t| t.as_table_mut())
            .ok_or("no [train]")?;
        for k in ["optimizer", "gradient_checkpointing"] {
            t.remove(k);
        }
        t.insert("vram".into(), p.into());
        std::fs::write(&job_path, toml::to_string(&v)?)?;
        job = JobConfig::load(&job_path)?;
    }
    let dev = device_of(dev)?;
    const WARMUP: u64 = 3;
    let times: Rc<RefCell<Vec<f64>>> = Rc::default();
    let mut last = 0.0;
    let t2 = times.clone();
    let watch = ObserveFn(move |e: &Event| {
        if let Event::Step {
            step,
            train_seconds,
            ..
        } = e
        {
            if *step == WARMUP {
                device::reset_peak(dev);
            } else if *step > WARMUP {
                t2.borrow_mut().push(train_seconds - last);
            }
            last = *train_seconds;
        }
    });
    let observers: Observers = vec![Box::new(watch)];
    let started = Instant::now();
    // under RANK / WORLD_SIZE (gpu-check.sh's data-parallel part) one rank
    let dist = lorakit::sdxl::dist::DistEnv::from_env()?
        .map(|e| lorakit::sdxl::dist::ProcessGroup::join(&e))
        .transpose()?
        .map(std::sync::Arc::new);
    if let Some(pg) = &dist {
        job.job.name = format!("{}_dp{}", job.job.name, pg.world());
    }
    let opts = TrainOptions {
        quiet: true,
        dist,
        ..Default::default()
    };
    let report = train_with(&job, &job_path, &opts, observers)?;
    let mut t = times.borrow().clone();
    t.sort_by(f64::total_cmp);
    let median = *t
        .get(t.len() / 2)
        .ok_or("no timed steps: raise STEPS above 4")?;
    let peak = device::memory(dev).map(|m| m.peak_allocated as f64 / (1u64 << 20) as f64);
    let tflop = train_tflop_per_sample(res as i64).map(|f| f * batch as f64 / median);
    Ok(json!({
        "side": "lorakit", "res": res, "batch": batch, "vram": preset,
        "gradient_checkpointing": job.train.gradient_checkpointing, "optimizer": job.train.optimizer,
        "s_per_step": median, "samples_per_s": batch as f64 / median,
        "peak_allocated_mib": peak, "model_tflop_per_s": tflop,
        "timed_steps": t.len(), "final_val_loss": report.val_losses.last().map(|v| v.1),
        "wall_s": started.elapsed().as_secs_f64(),
    }))
}

/// Seconds for one txt2img image (CFG 7, Euler, `STEPS` steps) at `RES`²,
/// after a warm-up image; the model load is not counted.
fn sample(args: &[String]) -> AnyResult<Value> {
    let [model, dev, res, steps] = args else {
        return Err("sample MODEL DEVICE RES STEPS".into());
    };
    let dev = device_of(dev)?;
    let kind = if dev.is_cuda() {
        Kind::Half
    } else {
        Kind::Float
    };
    let m = SdxlModel::load(model, kind, dev)?;
    let tok = lorakit::sdxl::ClipTokenizer::new();
    let res: u32 = res.parse()?;
    let params = lorakit::sdxl::GenerateParams {
        prompt: "a photo of a cat".into(),
        negative: "blurry".into(),
        width: res,
        height: res,
        steps: steps.parse()?,
        cfg: 7.0,
        seed: 1,
        ..Default::default()
    };
    let _ = lorakit::sdxl::txt2img(&m, &tok, &params, &mut |_| {})?;
    let t = Instant::now();
    let _ = lorakit::sdxl::txt2img(&m, &tok, &params, &mut |_| {})?;
    Ok(
        json!({"side": "lorakit", "res": res, "steps": params.steps, "s_per_image": t.elapsed().as_secs_f64(),
              "dtype": format!("{kind:?}")}),
    )
}
