//! End-to-end tests of the `lorakit` binary. Every run clears
//! LD_LIBRARY_PATH: the binary must find libtorch through its rpath.

use lora_testkit::Tolerance;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// Floors measured on an AMD EPYC (AVX-512) with 2 threads, 1 thread
// (OMP_NUM_THREADS=1) and MKL, oneDNN and ATen held to AVX2 / no SIMD
// (MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
// ATEN_CPU_CAPABILITY=default), set for the `lorakit` child process.

/// `lora resize` to a module's own rank rebuilds ΔW from fp32 factors of an
/// fp64 SVD: 8.5e-8 of max |ΔW| measured (all three); margin 100.
const RESIZED_SAME_RANK: Tolerance = Tolerance::new(8.5e-8, 100.0, "fp32 factors of the fp64 SVD");
/// `lora extract` of a rank-1 difference of 0.05 (fp32 SVD): 6.0e-8
/// absolute measured (all three; the fp32 tuned weight itself holds the
/// difference to 1.1e-8); margin 160.
const EXTRACTED_DELTA: Tolerance = Tolerance::new(6.0e-8, 160.0, "fp32 SVD of the difference");

fn lorakit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LORAKIT_LOG")
        .output()
        .expect("run lorakit")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lora-core/tests/fixtures")
        .join(name)
}

#[test]
fn version_reports_libtorch_and_cuda() {
    let o = lorakit(&["--version"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("libtorch 2.11.0"), "{out}");
    assert!(out.contains("CUDA"), "{out}");
    // the CUDA and cuDNN versions of a CUDA build (PyPI's torch is one),
    // and the attention backends
    if !out.contains("no CUDA build") {
        let cuda = out.split("CUDA ").nth(1).unwrap_or("");
        assert!(cuda.starts_with(|c: char| c.is_ascii_digit()), "{out}");
        assert!(out.contains(", cuDNN 9."), "{out}");
    }
    assert!(
        out.contains("attention SDPA: ") && out.contains("math"),
        "{out}"
    );
}

#[test]
fn inspect_reads_each_format() {
    for (file, format) in [
        ("kohya.safetensors", "kohya (LDM names)"),
        ("ai_toolkit.safetensors", "AI Toolkit"),
        ("peft.safetensors", "diffusers/PEFT"),
        ("diffusers_legacy.safetensors", "attention-processor"),
    ] {
        let o = lorakit(&["lora", "inspect", fixture(file).to_str().unwrap()]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{file}: {err}");
        assert!(out.contains(format), "{file}: {out}");
        assert!(
            out.contains("unet     13  (linear 8, conv 1x1 1, conv kxk 4)"),
            "{file}: {out}"
        );
        assert!(
            out.contains("te1       3") && out.contains("te2       2"),
            "{out}"
        );
    }
}

/// A LyCORIS LoKr file over kohya.safetensors' modules: `lora inspect`
/// reads it, `lora resize` refuses it by name.
#[test]
fn lycoris_files_are_inspected_and_not_resized() {
    use lora_core::lycoris::LycoAdapter;
    let dir = tempfile::tempdir().unwrap();
    let kohya =
        lora_core::load_lora(fixture("kohya.safetensors"), lora_core::UnknownKeys::Reject).unwrap();
    let mut set = lora_core::LoraSet::new();
    for (key, a) in kohya.set.iter() {
        let g = match a.geometry() {
            lora_core::Geometry::Conv2d { kernel, .. } => {
                lora_core::Geometry::conv(kernel[0], kernel[1])
            }
            g => g,
        };
        let l = LycoAdapter::new_lokr(
            a.in_features(),
            a.out_features(),
            2,
            Some(1.0),
            (4, false),
            g,
            (tch::Kind::Float, tch::Device::Cpu),
        )
        .unwrap();
        set.insert(key.clone(), lora_core::LoraAdapter::from_lyco(l));
    }
    let file = dir.path().join("lokr.safetensors");
    set.save(&file, tch::Kind::Half, &Default::default())
        .unwrap();
    let o = lorakit(&["lora", "inspect", file.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("LyCORIS"), "{out}");
    assert!(
        out.contains("unet     13  (lokr 13)") && out.contains("te1       3  (lokr 3)"),
        "{out}"
    );
    assert!(out.contains("rank full alpha 2.0"), "{out}");
    let o = lorakit(&[
        "lora",
        "resize",
        file.to_str().unwrap(),
        "--rank",
        "1",
        "--out",
        dir.path().join("r.safetensors").to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        err.contains("lokr") && err.contains("LoRA / LoCon"),
        "{err}"
    );
}

fn write_safetensors(path: &Path, keys: &[(&str, &[usize])]) {
    // A minimal hand-written safetensors file of zeros (F32).
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (k, shape) in keys {
        let n: usize = shape.iter().product::<usize>() * 4;
        header.insert(
            k.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(vec![0u8; offset]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_input_is_one_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("sd_xl_base_1.0.safetensors");
    write_safetensors(
        &ckpt,
        &[
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                &[4, 4, 3, 3],
            ),
            ("first_stage_model.decoder.conv_in.weight", &[4, 4, 3, 3]),
        ],
    );
    let o = lorakit(&["lora", "inspect", ckpt.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.starts_with("error: ") && err.contains("sd_xl_base_1.0.safetensors"),
        "{err}"
    );
    assert!(
        err.contains("not a LoRA") && err.contains("model.diffusion_model.input_blocks.0.0.weight"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let cut = dir.path().join("cut.safetensors");
    let good = std::fs::read(fixture("kohya.safetensors")).unwrap();
    std::fs::write(&cut, &good[..good.len() - 100]).unwrap();
    let o = lorakit(&["lora", "inspect", cut.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("cut.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let o = lorakit(&[
        "lora",
        "inspect",
        dir.path().join("nope.safetensors").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("nope.safetensors") && err.contains("No such file"),
        "{err}"
    );

    let o = lorakit(&["lora", "frobnicate"]);
    assert!(!o.status.success());
}

fn png_parameters(path: &Path) -> String {
    lora_sdxl::render::png_text(path)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[test]
fn demo_trains_saves_samples_and_compares() {
    let dir = tempfile::tempdir().unwrap();
    let o = lorakit(&["demo", "--out", dir.path().to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let run = dir.path().join("demo");
    for f in [
        "demo.safetensors",
        "demo_000000050.safetensors",
        "demo_000000250.safetensors",
        "loss.csv",
        "loss.png",
        "scores.txt",
        "state.safetensors",
        "samples/000000000_p00.png",
        "samples/000000500_p03.png",
    ] {
        assert!(run.join(f).exists(), "{f} missing: {out}");
    }
    // The in-training grid: 4 prompts × 11 sample rounds (steps 0..=500 by 50) of 64 px.
    let grid = image::open(run.join("samples/grid.png")).unwrap();
    assert!(
        grid.width() > 11 * 64 && grid.height() > 4 * 64,
        "{:?}",
        (grid.width(), grid.height())
    );
    let p = png_parameters(&run.join("samples/000000100_p01.png"));
    assert!(
        p.starts_with("myakumyaku-san, small, on the left, night <lora:demo_000000100:0.8>\nNegative prompt: \nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 42, Size: 64x64, Model: toy_world"),
        "{p}"
    );
    assert!(
        dir.path().join("job.toml").exists() && dir.path().join("dataset/char_000.png").exists()
    );
    assert!(out.contains("by step: 0: "), "{out}");
    // one score row per checkpoint and the base
    let scores = std::fs::read_to_string(run.join("scores.txt")).unwrap();
    assert_eq!(scores.lines().count(), 1 + 11, "{scores}");
    // the validation loss falls clearly
    let pct: f64 = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("falls by ")?
                .split('%')
                .next()?
                .parse()
                .ok()
        })
        .unwrap();
    assert!(pct > 5.0, "validation loss fell only {pct}%: {out}");
    let o = lorakit(&[
        "lora",
        "inspect",
        run.join("demo.safetensors").to_str().unwrap(),
    ]);
    let (out, _) = text(&o);
    assert!(
        o.status.success() && out.contains("trigger            myakumyaku-san"),
        "{out}"
    );

    // `lorakit sample` with the final LoRA: PNG with A1111 parameters.
    let model = dir.path().join("toy_world.safetensors");
    let samples = dir.path().join("s");
    let lora_arg = format!("{}:0.8", run.join("demo.safetensors").display());
    let common = [
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--seed",
        "7",
    ];
    let mut args = vec![
        "sample",
        "--prompt",
        "myakumyaku-san, beach",
        "--lora",
        &lora_arg,
        "--batch",
        "2",
        "--out",
        samples.to_str().unwrap(),
    ];
    args.extend(common);
    let o = lorakit(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("00001-7.png"), "{out}");
    let p = png_parameters(&samples.join("00000-7.png"));
    assert!(p.starts_with("myakumyaku-san, beach <lora:demo:0.8>\nNegative prompt: \nSteps: 3, Sampler: Euler, Schedule type: Normal, CFG scale: 7, Seed: 7, Size: 64x64, Model: toy_world, Lora hashes: \"demo: "), "{p}");
    assert!(
        p.ends_with(&format!("Version: lorakit {}", env!("CARGO_PKG_VERSION"))),
        "{p}"
    );

    // `lorakit grid`: checkpoints (given out of order) × strengths, plus the base column.
    let grid_dir = dir.path().join("g");
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# test prompts\nmyakumyaku-san, beach\n\nmyakumyaku-san, snow\n",
    )
    .unwrap();
    let c150 = run.join("demo_000000150.safetensors");
    let c50 = run.join("demo_000000050.safetensors");
    let mut args = vec![
        "grid",
        "--loras",
        c150.to_str().unwrap(),
        c50.to_str().unwrap(),
        "--strengths",
        "0.5,1",
        "--with-base",
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        grid_dir.to_str().unwrap(),
    ];
    args.extend(common);
    let o = lorakit(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(
        out.contains("2 prompt(s) × 5 column(s) = 10 images"),
        "{out}"
    );
    let names: Vec<String> = (0..5)
        .map(|c| {
            let label = [
                "no_LoRA",
                "step_50___0.5",
                "step_50___1",
                "step_150___0.5",
                "step_150___1",
            ][c];
            format!("c{c:02}_{label}_p01.png")
        })
        .collect();
    for n in &names {
        assert!(grid_dir.join(n).exists(), "{n} missing");
    }
    assert!(png_parameters(&grid_dir.join(&names[3])).contains("<lora:demo_000000150:0.5>"));
    assert!(!png_parameters(&grid_dir.join(&names[0])).contains("<lora:"));
    let g = image::open(grid_dir.join("grid.png")).unwrap();
    assert!(g.width() > 5 * 64 && g.height() > 2 * 64);
    // Bad input: one clear error.
    let o = lorakit(&[
        "grid",
        "--model",
        model.to_str().unwrap(),
        "--loras",
        c50.to_str().unwrap(),
        "--device",
        "cpu",
        "--width",
        "100",
        "--prompt",
        "x",
    ]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("--width: 100 must be a multiple of 8"),
        "{err}"
    );
}

#[test]
fn train_stops_cleanly_on_sigint_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.safetensors");
    lora_sdxl::synthetic::write_random_checkpoint(
        &model,
        &lora_sdxl::SdxlConfig::tiny(),
        1,
        tch::Kind::Half,
    )
    .unwrap();
    let data = dir.path().join("data");
    lora_data::synthetic::write_character_dataset(&data, 4, 256, 256, "trig", 1).unwrap();
    let job = dir.path().join("job.toml");
    let mut text_job =
        lora_sdxl::JobConfig::template(model.to_str(), data.to_str(), Some("trig"), None);
    text_job = text_job
        .replace("steps = 3000", "steps = 400")
        .replace("save_every = 100", "save_every = 1000")
        .replace("resolution = [512, 768]", "resolution = [256]")
        .replace("dtype = \"bf16\"", "dtype = \"fp32\"")
        .replace("# device = \"cuda\"", "device = \"cpu\"");
    std::fs::write(&job, text_job).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(["train", job.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until training is under way (the step-0 validation line), then Ctrl-C
    let csv = dir.path().join("output/trig/loss.csv");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&csv)
        .map(|s| s.lines().count() >= 2)
        .unwrap_or(false)
    {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("--resume") && err.contains("stopping after this step"),
        "{out}{err}"
    );
    let run = dir.path().join("output/trig");
    assert!(run.join("state.safetensors").exists());
    let step_files: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("trig_"))
        .collect();
    assert_eq!(step_files.len(), 1, "one checkpoint at the stop step");
    // resume a little further: raise nothing, just check it says where it resumes
    let text_job = std::fs::read_to_string(&job)
        .unwrap()
        .replace("steps = 400", "steps = 1");
    std::fs::write(&job, text_job).unwrap();
    let o = lorakit(&["train", job.to_str().unwrap(), "--resume"]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("raise train.steps"),
        "{err}"
    );
}

fn small_dataset(dir: &Path) {
    for (i, (w, h)) in [(640u32, 640u32), (800, 600), (600, 800)]
        .iter()
        .enumerate()
    {
        image::RgbImage::from_pixel(*w, *h, image::Rgb([i as u8 * 50, 100, 150]))
            .save(dir.join(format!("img{i}.png")))
            .unwrap();
    }
    std::fs::write(dir.join("img0.txt"), "trig, 1girl, blue skin").unwrap();
    std::fs::write(dir.join("img1.txt"), "1girl, blue skin, smile").unwrap();
    std::fs::write(dir.join("img2.txt"), "trig, blue skin, night").unwrap();
}

#[test]
fn dataset_check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let d = dir.path().to_str().unwrap();
    let o = lorakit(&["dataset", "check", d, "--resolution", "512"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("images:      3 usable of 3 image files"),
        "{out}"
    );
    assert!(out.contains("buckets@512:"), "{out}");

    let o = lorakit(&[
        "dataset",
        "check",
        d,
        "--trigger",
        "trig",
        "--resolution",
        "512,768",
    ]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        out.contains("warning img1.txt: trigger word `trig` missing"),
        "{out}"
    );

    // the job's resolutions and trigger (a 256 job: no 512/768 buckets)
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\ntrigger_word = \"trig\"\n[[datasets]]\nfolder_path = {:?}\nresolution = [256]\n",
            d
        ),
    )
    .unwrap();
    let o = lorakit(&["dataset", "check", d, "--job", job.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("buckets@256:") && !out.contains("buckets@512"),
        "{out}"
    );
    assert!(out.contains("trigger word `trig` missing"), "{out}");

    std::fs::write(dir.path().join("broken.png"), b"nope").unwrap();
    let o = lorakit(&["dataset", "check", d]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("error   broken.png: not a PNG"), "{out}");

    let empty = tempfile::tempdir().unwrap();
    let o = lorakit(&["dataset", "check", empty.path().to_str().unwrap()]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(out.contains("NOT trainable"), "{out}");

    let o = lorakit(&[
        "dataset",
        "check",
        dir.path().join("img0.png").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("img0.png: not a folder"), "{err}");

    let o = lorakit(&["dataset", "check", d, "--resolution", "500"]);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("multiples of 64"),
        "{err}"
    );
}

#[test]
fn dataset_check_reports_missing_and_mis_sized_masks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let masks = dir.path().join("masks");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    small_dataset(&data);
    image::GrayImage::new(640, 640)
        .save(masks.join("img0.png"))
        .unwrap();
    image::GrayImage::new(400, 300)
        .save(masks.join("img1.png"))
        .unwrap();
    let (d, m) = (data.to_str().unwrap(), masks.to_str().unwrap());
    let o = lorakit(&["dataset", "check", d, "--mask-path", m]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("images:      1 usable of 3"), "{out}");
    assert!(
        out.contains("error   img1.png: its mask")
            && out.contains("400×300 but the image is 800×600"),
        "{out}"
    );
    assert!(
        out.contains("error   img2.png: no mask in mask_path"),
        "{out}"
    );
    assert!(
        !out.contains("img0.png: its mask") && !out.contains("img0.png: no mask"),
        "{out}"
    );
    // the job's mask_path, relative to the job file
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        "[[datasets]]\nfolder_path = \"data\"\nmask_path = \"masks\"\n",
    )
    .unwrap();
    let o = lorakit(&["dataset", "check", d, "--job", job.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(
        o.status.code() == Some(1) && out.contains("img2.png: no mask"),
        "{out}"
    );
    // alpha masks: opaque RGB images are reported, training stays possible
    let o = lorakit(&["dataset", "check", d, "--alpha-mask"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("warning img0.png: alpha_mask is on but the image has no alpha channel"),
        "{out}"
    );
}

#[test]
fn caption_commands() {
    let dir = tempfile::tempdir().unwrap();
    small_dataset(dir.path());
    let d = dir.path().to_str().unwrap();
    let o = lorakit(&["caption", "add-trigger", d, "trig", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("img1.txt\n- 1girl, blue skin, smile\n+ trig, 1girl, blue skin, smile"),
        "{out}"
    );
    assert!(
        out.contains("would change 1 caption file(s) (dry run"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("img1.txt")).unwrap(),
        "1girl, blue skin, smile"
    );

    let o = lorakit(&["caption", "stats", d, "--trigger", "trig"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains("in more than half of the captions: blue skin, 1girl"),
        "{out}"
    );

    let o = lorakit(&["caption", "remove-tags", d, "Blue Skin"]);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("img2.txt")).unwrap(),
        "trig, night"
    );
    let o = lorakit(&["caption", "replace-tag", d, "night", "evening"]);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("img2.txt")).unwrap(),
        "trig, evening"
    );
}

#[test]
fn model_inspect() {
    let ckpt = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lora-sdxl/tests/fixtures/tiny_b.safetensors");
    let o = lorakit(&["model", "inspect", ckpt.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("model:       SDXL family"), "{out}");
    assert!(out.contains("transformer depth [0, 2, 1]"), "{out}");
    assert!(out.contains("read:        all 905 tensors"), "{out}");
    let lora = fixture("kohya.safetensors");
    let o = lorakit(&["model", "inspect", lora.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("this is a LoRA file"), "{err}");
}

#[test]
fn init_writes_a_valid_template() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("job.toml");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lora-sdxl/tests/fixtures/tiny_a.safetensors");
    let args = [
        "init",
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--trigger",
        "myakumyaku-san",
    ];
    let o = lorakit(&args);
    assert!(o.status.success(), "{}", text(&o).1);
    // told the model and the dataset, it does not ask to edit them
    let said = text(&o).0;
    assert!(
        !said.contains("name_or_path")
            && !said.contains("folder_path")
            && said.contains("lorakit train"),
        "{said}"
    );
    let cfg = lora_sdxl::JobConfig::load(&out).unwrap();
    cfg.validate(&out).unwrap();
    assert_eq!(cfg.job.trigger_word.as_deref(), Some("myakumyaku-san"));
    assert_eq!(cfg.train.lr, 7e-5);
    // a fresh identity, so its state is never resumed by another job
    let id = cfg.job.id.clone().unwrap_or_default();
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id:?}"
    );
    // no overwrite without --force
    let o = lorakit(&args);
    assert!(!o.status.success() && text(&o).1.contains("--force"));
    // without them, it names what to edit
    let bare = dir.path().join("bare.toml");
    let o = lorakit(&["init", "--out", bare.to_str().unwrap()]);
    let said = text(&o).0;
    assert!(
        said.contains("model.name_or_path and datasets.folder_path"),
        "{said}"
    );
    let other = lora_sdxl::JobConfig::load(&bare).unwrap().job.id;
    assert!(
        other.is_some() && other != cfg.job.id,
        "each init its own id"
    );
}

/// `lora resize`: rank 2 everywhere keeps ΔW of rank-2 modules and reduces
/// the rest; a dynamic rule picks per-module ranks; the output is a kohya
/// file with updated metadata and fresh hashes; bad use is one clear error.
#[test]
fn lora_resize_writes_a_smaller_kohya_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("kohya.safetensors");
    let before = lora_core::load_lora(&input, lora_core::UnknownKeys::Reject).unwrap();
    let out = dir.path().join("r2.safetensors");
    let o = lorakit(&[
        "lora",
        "resize",
        input.to_str().unwrap(),
        "--rank",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("resized 18 modules"), "{stdout}");
    assert!(stdout.contains("ranks after:  2 ×18"), "{stdout}");
    let after = lora_core::load_lora(&out, lora_core::UnknownKeys::Reject).unwrap();
    assert_eq!(after.format, lora_core::LoraFormat::Kohya);
    assert_eq!(after.set.len(), before.set.len());
    assert_eq!(after.dtypes.keys().collect::<Vec<_>>(), vec!["F32"]);
    for (key, a) in before.set.iter() {
        let b = after.set.get(key).expect("module kept");
        assert_eq!(b.rank(), 2, "{key:?}");
        let (da, db) = (a.delta_weight(), b.delta_weight());
        let scale = da.abs().max().double_value(&[]);
        let diff = (&da - &db).abs().max().double_value(&[]) / scale;
        if a.rank() == 2 {
            RESIZED_SAME_RANK.check(format!("{key:?}: rank 2 kept"), diff);
        } else {
            // an effect, not a tolerance: the rank-4 modules measured 0.27–0.79
            assert!(
                diff > 1e-4,
                "{key:?}: a rank-4 module cannot stay exact at rank 2"
            );
        }
    }
    assert_eq!(after.metadata["ss_network_dim"], "2");
    assert_eq!(after.metadata["ss_network_alpha"], "1.0");
    assert!(after.metadata["ss_training_comment"].starts_with("dimension is resized from 4 to 2"));
    assert_ne!(
        after.metadata.get("sshs_model_hash"),
        before.metadata.get("sshs_model_hash")
    );
    assert!(after.file_size < before.file_size);

    // dynamic, fp16, default name beside a copy of the input
    let copy = dir.path().join("mine.safetensors");
    std::fs::copy(&input, &copy).unwrap();
    let o = lorakit(&[
        "lora",
        "resize",
        copy.to_str().unwrap(),
        "--rank",
        "3",
        "--rule",
        "sv_fro:0.5",
        "--dtype",
        "fp16",
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    let dynamic = dir.path().join("mine-dyn3.safetensors");
    let d = lora_core::load_lora(&dynamic, lora_core::UnknownKeys::Reject).unwrap();
    assert_eq!(d.metadata["ss_network_dim"], "Dynamic");
    assert_eq!(d.dtypes.keys().collect::<Vec<_>>(), vec!["F16"]);
    assert!(d.set.iter().all(|(_, a)| a.rank() <= 3));
    assert!(
        d.set.iter().any(|(_, a)| a.rank() < 2),
        "keeping half the norm drops some modules to rank 1"
    );

    // errors: existing output, output = input, bad rule, bad rank
    for (args, expect) in [
        (
            vec!["--rank", "2", "--out", out.to_str().unwrap()],
            "exists; pass --force",
        ),
        (
            vec!["--rank", "2", "--out", copy.to_str().unwrap(), "--force"],
            "replace the input",
        ),
        (vec!["--rank", "2", "--rule", "sv_fro:2"], "--rule"),
        (vec!["--rank", "0"], "--rank must be at least 1"),
    ] {
        let mut all = vec!["lora", "resize", copy.to_str().unwrap()];
        all.extend(args);
        let o = lorakit(&all);
        let (_, stderr) = text(&o);
        assert!(!o.status.success());
        assert!(stderr.contains(expect), "{all:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `lora extract`: a copy of the tiny base with one changed attention weight
/// gives a one-module kohya LoRA reproducing the change; bad pairs are one
/// clear error.
#[test]
fn lora_extract_from_two_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lora-sdxl/tests/fixtures/tiny_a.safetensors");
    let mut tensors = lora_core::io::read_tensors(&base).unwrap().tensors;
    let (key, w) = tensors
        .iter_mut()
        .find(|(k, _)| k.ends_with("attn1.to_q.weight"))
        .unwrap();
    let key = key.clone();
    let (o, i) = (w.size()[0], w.size()[1]);
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let delta = tch::Tensor::ones([o, 1], opts).matmul(&tch::Tensor::ones([1, i], opts)) * 0.05;
    *w = w.to_kind(tch::Kind::Float) + &delta;
    let tuned = dir.path().join("tuned.safetensors");
    let bytes = lora_core::io::serialize(&tensors, &Default::default()).unwrap();
    std::fs::write(&tuned, bytes).unwrap();
    let out = dir.path().join("x.safetensors");
    let o = lorakit(&[
        "lora",
        "extract",
        "--base",
        base.to_str().unwrap(),
        "--tuned",
        tuned.to_str().unwrap(),
        "--rank",
        "4",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--clamp-quantile",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("extracted 1 modules (UNet 1, CLIP-L 0, bigG 0)"),
        "{stdout}"
    );
    assert!(stdout.contains("UNet only"), "{stdout}");
    let l = lora_core::load_lora(&out, lora_core::UnknownKeys::Reject).unwrap();
    assert_eq!(l.set.len(), 1);
    let (k, a) = l.set.iter().next().unwrap();
    assert!(key.contains(&k.path), "{key} vs {k:?}");
    let d = (a.delta_weight() - &delta).abs().max().double_value(&[]);
    EXTRACTED_DELTA.check("extracted ΔW vs the difference", d);
    assert_eq!(l.metadata["ss_network_dim"], "4");
    assert!(
        l.metadata["ss_training_comment"].contains("tuned.safetensors minus tiny_a.safetensors")
    );

    let lora = fixture("kohya.safetensors");
    let o = lorakit(&[
        "lora",
        "extract",
        "--base",
        base.to_str().unwrap(),
        "--tuned",
        lora.to_str().unwrap(),
        "--out",
        dir.path().join("y.safetensors").to_str().unwrap(),
    ]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("kohya.safetensors") && stderr.contains("LoRA"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `model merge`: a LoRA baked into the tiny checkpoint gives a checkpoint
/// `model inspect` reads in full; an existing output is not replaced.
#[test]
fn model_merge_writes_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lora-sdxl/tests/fixtures");
    let base = fixtures.join("tiny_a.safetensors");
    let lora = format!("{}:0.8", fixtures.join("tiny_a_lora.safetensors").display());
    let out = dir.path().join("merged.safetensors");
    let args = [
        "model",
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--lora",
        &lora,
        "--out",
        out.to_str().unwrap(),
    ];
    let o = lorakit(&args);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("merged 16 LoRA modules (tiny_a_lora:0.8)"),
        "{stdout}"
    );
    let o = lorakit(&["model", "inspect", out.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    let o = lorakit(&args);
    let (_, stderr) = text(&o);
    assert!(
        !o.status.success() && stderr.contains("exists; pass --force"),
        "{stderr}"
    );
}

/// Warnings go through `tracing`; when stderr is not a terminal (a pipe, a
/// log file) they carry no colour codes.
#[test]
fn log_lines_have_no_colour_codes_when_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("nan.safetensors");
    let down = tch::Tensor::from_slice(&[f32::NAN, 1.0, 2.0, 3.0]).view([1, 4]);
    let up = tch::Tensor::ones([4, 1], (tch::Kind::Float, tch::Device::Cpu));
    let name = "lora_unet_input_blocks_4_1_proj_in";
    let tensors = vec![
        (format!("{name}.lora_down.weight"), down),
        (format!("{name}.lora_up.weight"), up),
    ];
    let bytes = lora_core::io::serialize(&tensors, &Default::default()).unwrap();
    std::fs::write(&bad, bytes).unwrap();
    let o = lorakit(&["lora", "inspect", bad.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(err.contains("NaN"), "no warning on stderr: {out}{err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe: {err:?}");
}
