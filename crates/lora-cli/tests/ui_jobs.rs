//! `lorakit ui`'s jobs end to end: the real binary serves the UI, runs
//! are real `lorakit train` child processes on a tiny SDXL-architecture
//! model. A job is created from the form's fields, queued, run to the end
//! and its checkpoint downloaded; a second is stopped, resumed, and
//! followed by a restarted UI after the first UI was killed. The caption
//! endpoints come from the flags, then `ROOT/ui.toml`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn call(
    ui: &UiProcess,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let url = format!("{}{path}", ui.base);
    let a = agent();
    let resp = match (method, body) {
        ("GET", _) => a.get(&url).header("X-Lorakit-Token", TOKEN).call(),
        ("DELETE", _) => a.delete(&url).header("X-Lorakit-Token", TOKEN).call(),
        (_, b) => a
            .post(&url)
            .header("X-Lorakit-Token", TOKEN)
            .header("Content-Type", "application/json")
            .send(b.unwrap_or(serde_json::json!({})).to_string()),
    };
    let mut resp = resp.unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// How long a run may take to reach what a test waits for. A deadline, not
/// a measurement: on this machine each wait ends within 40 s, but CI showed
/// one stop (a step, two atomic writes with fsync) unfinished after 60 s
/// on a loaded machine, so the deadline is generous, and a miss prints
/// where each of the run's threads sleeps in the kernel.
const DEADLINE: u64 = 300;

/// Polls the job until `done` says so (at most [`DEADLINE`] seconds).
fn wait_for(
    ui: &UiProcess,
    root: &Path,
    job: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let (_, j) = call(ui, "GET", &format!("/api/jobs/{job}"), None);
        if done(&j) {
            return j;
        }
        if t0.elapsed().as_secs() >= DEADLINE {
            panic!(
                "gave up waiting after {DEADLINE} s: {j:#}\nthe run's threads: {}",
                run_threads(root)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// For a failure message: each thread of the running job's process (pid
/// from the queue file) with its state and kernel wait channel, so a hang
/// shows whether it sleeps in a lock (`futex_…`) or on the disk (`jbd2_…`).
fn run_threads(root: &Path) -> String {
    let queue = std::fs::read(root.join("jobs/queue.json")).unwrap_or_default();
    let entries: serde_json::Value = serde_json::from_slice(&queue).unwrap_or_default();
    let pids = entries.as_array().into_iter().flatten();
    let Some(pid) = pids.filter_map(|e| e["pid"].as_u64()).next() else {
        return format!("no running pid in queue.json: {entries}");
    };
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.flatten());
    let Ok(tasks) = tasks else {
        return format!("pid {pid}: gone");
    };
    tasks
        .map(|t| {
            let stat = read(t.path().join("stat"));
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            format!(
                "\n  {} {} {}: {}",
                t.file_name().to_string_lossy(),
                read(t.path().join("comm")).trim(),
                state.unwrap_or("?"),
                read(t.path().join("wchan"))
            )
        })
        .collect()
}

fn new_job(name: &str, steps: u64) -> serde_json::Value {
    serde_json::json!({
        "name": name, "model": "tiny.safetensors", "dataset": "chars",
        "fields": {
            "job.trigger_word": "trig", "job.device": "cpu",
            "network.linear": 4, "network.linear_alpha": 4.0, "network.conv": 2, "network.conv_alpha": 2.0,
            "save.save_every": 3, "save.max_step_saves_to_keep": 30,
            "train.steps": steps, "train.batch_size": 1, "train.gradient_accumulation": 1,
            "train.lr": 1e-3, "train.dtype": "fp32",
            "datasets.resolution": [256],
        }
    })
}

fn state(j: &serde_json::Value) -> &str {
    j["state"].as_str().unwrap_or("")
}

#[test]
fn a_job_from_the_form_runs_to_the_end_and_its_checkpoint_downloads() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let _runs = setup(&root);
    let ui = start_ui(&root, &[]);
    assert_eq!(
        call(&ui, "GET", "/api/models", None).1,
        serde_json::json!(["tiny.safetensors"])
    );

    // The trainer's own validation, answered next to the field.
    let mut bad = new_job("bad", 6);
    bad["fields"]["network.linear"] = serde_json::json!(0);
    let (status, e) = call(&ui, "POST", "/api/jobs", Some(bad));
    assert_eq!(
        (status, e["field"].as_str()),
        (422, Some("network.linear")),
        "{e}"
    );
    let elsewhere = tmp.path().join("elsewhere.safetensors");
    std::fs::copy(root.join("models/tiny.safetensors"), &elsewhere).unwrap();
    let outside = serde_json::json!({"name": "outside", "toml": format!(
        "[model]\nname_or_path = {:?}\n[[datasets]]\nfolder_path = \"../../datasets/chars\"\n",
        elsewhere.to_str().unwrap())});
    let (status, e) = call(&ui, "POST", "/api/jobs", Some(outside));
    assert_eq!(
        (status, e["field"].as_str()),
        (422, Some("model.name_or_path")),
        "{e}"
    );

    // A mask folder outside the root is refused like a dataset (issue 26).
    let masks = tmp.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    let mut masked = new_job("masked", 6);
    masked["fields"]["datasets.mask_path"] = serde_json::json!(masks.to_str().unwrap());
    let (status, e) = call(&ui, "POST", "/api/jobs", Some(masked));
    assert_eq!(
        (status, e["field"].as_str()),
        (422, Some("datasets[0].mask_path")),
        "{e}"
    );

    // A link in models/ to a checkpoint kept elsewhere is a model (the run reads it).
    std::os::unix::fs::symlink(&elsewhere, root.join("models/linked.safetensors")).unwrap();
    let mut linked = new_job("linked", 6);
    linked["model"] = serde_json::json!("linked.safetensors");
    assert_eq!(call(&ui, "POST", "/api/jobs", Some(linked)).0, 201);

    // The first job samples as it trains (prompts × steps grid on the job page).
    let mut first = new_job("first", 6);
    for (k, v) in [
        ("sample.disable", serde_json::json!(false)),
        ("sample.sample_every", serde_json::json!(3)),
        ("sample.prompts", serde_json::json!(["trig"])),
        ("sample.sample_steps", serde_json::json!(2)),
        ("sample.width", serde_json::json!(64)),
        ("sample.height", serde_json::json!(64)),
    ] {
        first["fields"][k] = v;
    }
    assert_eq!(call(&ui, "POST", "/api/jobs", Some(first)).0, 201);
    let toml = std::fs::read_to_string(root.join("jobs/first/job.toml")).unwrap();
    assert!(
        toml.contains("linear = 4") && toml.contains("# rank of Linear"),
        "the template's comments stay"
    );
    // The saved file is what `lorakit train` runs: it validates unchanged.
    let cfg = lora_sdxl::JobConfig::load(&root.join("jobs/first/job.toml")).unwrap();
    cfg.validate(&root.join("jobs/first/job.toml")).unwrap();

    // A run that dies is marked failed with its last log lines, and the queue goes on.
    std::fs::write(root.join("models/broken.safetensors"), b"not a checkpoint").unwrap();
    let mut broken = new_job("broken", 6);
    broken["model"] = serde_json::json!("broken.safetensors");
    assert_eq!(call(&ui, "POST", "/api/jobs", Some(broken)).0, 201);
    assert_eq!(call(&ui, "POST", "/api/jobs/broken/start", None).0, 200);
    assert_eq!(call(&ui, "POST", "/api/jobs/first/start", None).0, 200);
    let b = wait_for(&ui, &root, "broken", |j| {
        !matches!(state(j), "queued" | "running" | "")
    });
    assert_eq!(state(&b), "failed", "{b:#}");
    assert!(
        b["error"].as_str().unwrap().contains("broken.safetensors"),
        "{b:#}"
    );
    let j = wait_for(&ui, &root, "first", |j| {
        !matches!(state(j), "queued" | "running" | "")
    });
    assert_eq!(state(&j), "done", "{j:#}");
    let p = &j["progress"];
    assert_eq!(
        (p["step"].as_u64(), p["total_steps"].as_u64()),
        (Some(6), Some(6)),
        "{p:#}"
    );
    let files: Vec<&str> = p["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        files,
        ["first_000000003.safetensors", "first.safetensors"],
        "{p:#}"
    );
    assert!(p["checkpoints"][1]["val_loss"].as_f64().is_some(), "{p:#}");

    let url = format!(
        "{}/api/jobs/first/files/first_000000003.safetensors",
        ui.base
    );
    let mut resp = agent()
        .get(&url)
        .header("X-Lorakit-Token", TOKEN)
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    let got = tmp.path().join("downloaded.safetensors");
    std::fs::write(&got, &bytes).unwrap();
    let lora =
        lora_core::formats::load_lora(&got, lora_core::formats::UnknownKeys::Reject).unwrap();
    assert!(!lora.set.is_empty());
    assert_eq!(p["samples_step"].as_u64(), Some(6), "{p:#}");
    let mut grid = agent()
        .get(&format!("{}/api/jobs/first/samples/grid.png", ui.base))
        .header("X-Lorakit-Token", TOKEN)
        .call()
        .unwrap();
    assert_eq!(grid.status().as_u16(), 200);
    let png = grid.body_mut().read_to_vec().unwrap();
    assert!(image::load_from_memory(&png).is_ok());

    // Compare: a prompts × checkpoints grid at a fixed seed and strength.
    let body = serde_json::json!({"checkpoints": files, "prompts": ["trig, standing", "trig, sitting"],
        "seed": 7, "strength": 0.8, "steps": 2, "size": 64});
    assert_eq!(
        call(&ui, "POST", "/api/jobs/first/compare", Some(body)).0,
        202
    );
    let t0 = Instant::now();
    let g = loop {
        let (_, g) = call(&ui, "GET", "/api/jobs/first/compare", None);
        // queued behind any run, then rendering
        if g["state"] != "queued" && g["state"] != "running" {
            break g;
        }
        assert!(t0.elapsed().as_secs() < 180, "{g:#}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(g["state"], "done", "{g:#}");
    let cells = g["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4, "2 prompts × 2 checkpoints: {g:#}");
    for c in cells {
        let p = c["parameters"].as_str().unwrap();
        assert!(p.contains("Seed: 7") && p.contains(":0.8>"), "{p}");
    }
    let cell = cells[0]["file"].as_str().unwrap();
    let mut img = agent()
        .get(&format!("{}/api/jobs/first/compare/{cell}", ui.base))
        .header("X-Lorakit-Token", TOKEN)
        .call()
        .unwrap();
    let png = img.body_mut().read_to_vec().unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 64);
    // "The one": remembered in the job, copied out as the final LoRA.
    assert_eq!(
        call(&ui, "POST", "/api/jobs/first/export", None).0,
        409,
        "nothing picked yet"
    );
    let (status, p) = call(
        &ui,
        "POST",
        "/api/jobs/first/pick",
        Some(serde_json::json!({"file": files[0]})),
    );
    assert_eq!((status, p["step"].as_u64()), (200, Some(3)), "{p}");
    assert_eq!(
        call(&ui, "GET", "/api/jobs/first/compare", None).1["picked"]["step"],
        3
    );
    assert_eq!(call(&ui, "POST", "/api/jobs/first/export", None).0, 200);
    assert_eq!(
        std::fs::read(root.join("loras/first.safetensors")).unwrap(),
        std::fs::read(root.join("jobs/first/output/first/first_000000003.safetensors")).unwrap()
    );
    assert_eq!(
        agent()
            .get(&format!("{}/api/jobs/first/files/..%2Fjob.toml", ui.base))
            .header("X-Lorakit-Token", TOKEN)
            .call()
            .unwrap()
            .status()
            .as_u16(),
        400
    );
}

#[test]
fn stop_resume_and_a_restarted_ui_follow_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root: PathBuf = tmp.path().join("root");
    let _runs = setup(&root);
    let ui = start_ui(&root, &[]);
    assert_eq!(
        call(&ui, "POST", "/api/jobs", Some(new_job("long", 5000))).0,
        201
    );
    assert_eq!(call(&ui, "POST", "/api/jobs/long/start", None).0, 200);
    assert_eq!(
        call(&ui, "POST", "/api/jobs/long/start", None).0,
        409,
        "one entry per job"
    );
    let step_of = |j: &serde_json::Value| j["progress"]["step"].as_u64().unwrap_or(0);
    wait_for(&ui, &root, "long", |j| {
        state(j) == "running" && step_of(j) >= 2
    });
    // extending a running job is refused and leaves its job file as it was
    let job_file = root.join("jobs/long/job.toml");
    let before = std::fs::read_to_string(&job_file).unwrap();
    let more = serde_json::json!({"steps": 9000});
    assert_eq!(
        call(&ui, "POST", "/api/jobs/long/extend", Some(more)).0,
        409
    );
    assert_eq!(std::fs::read_to_string(&job_file).unwrap(), before);
    assert_eq!(call(&ui, "POST", "/api/jobs/long/stop", None).0, 200);
    let j = wait_for(&ui, &root, "long", |j| state(j) != "running");
    assert_eq!(state(&j), "stopped", "{j:#}");
    let stopped_at = step_of(&j);
    assert!(root
        .join("jobs/long/output/long/state.safetensors")
        .is_file());

    // Resume, then kill the UI (not the run) and start a new one on the same root.
    assert_eq!(call(&ui, "POST", "/api/jobs/long/resume", None).0, 200);
    wait_for(&ui, &root, "long", |j| {
        state(j) == "running" && step_of(j) > stopped_at
    });
    drop(ui);
    let ui = start_ui(&root, &[]);
    let j = call(&ui, "GET", "/api/jobs/long", None).1;
    assert_eq!(
        state(&j),
        "running",
        "the restarted UI follows the live run: {j:#}"
    );
    let before = step_of(&j);
    wait_for(&ui, &root, "long", |j| step_of(j) > before);
    assert_eq!(call(&ui, "POST", "/api/jobs/long/stop", None).0, 200);
    let j = wait_for(&ui, &root, "long", |j| state(j) != "running");
    assert_eq!(state(&j), "stopped", "{j:#}");
    assert!(step_of(&j) > stopped_at);
    // Deleting keeps the checkpoints unless asked.
    assert_eq!(
        call(&ui, "DELETE", "/api/jobs/long", None).0,
        400,
        "needs confirm"
    );
    let (status, d) = call(&ui, "DELETE", "/api/jobs/long?confirm=true", None);
    assert_eq!((status, d["checkpoints_kept"].as_bool()), (200, Some(true)));
    assert!(root
        .join("jobs/long/output/long/state.safetensors")
        .is_file());
    assert!(!root.join("jobs/long/job.toml").exists());
    // issue 26: a new job of that name started by resuming the old run.
    // The name stays reserved while the old run's checkpoints are kept.
    let (status, e) = call(&ui, "POST", "/api/jobs", Some(new_job("long", 6)));
    assert_eq!(status, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("reserved"), "{e}");
    let gone = "/api/jobs/long?confirm=true&with_checkpoints=true";
    assert_eq!(call(&ui, "DELETE", gone, None).0, 200);
    assert!(!root.join("jobs/long").exists());
    assert_eq!(
        call(&ui, "POST", "/api/jobs", Some(new_job("long", 6))).0,
        201
    );
}

#[test]
fn a_stop_while_the_run_starts_stops_it_after_its_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root: PathBuf = tmp.path().join("root");
    let _runs = setup(&root);
    let ui = start_ui(&root, &[]);
    assert_eq!(
        call(&ui, "POST", "/api/jobs", Some(new_job("early", 5000))).0,
        201
    );
    assert_eq!(call(&ui, "POST", "/api/jobs/early/start", None).0, 200);
    // Stop as soon as the queue started the process: it is still loading
    // libtorch, long before its Ctrl-C handler exists.
    wait_for(&ui, &root, "early", |j| state(j) == "running");
    assert_eq!(call(&ui, "POST", "/api/jobs/early/stop", None).0, 200);
    let j = wait_for(&ui, &root, "early", |j| state(j) != "running");
    // stop 36: the SIGINT killed the starting run and the job showed failed
    assert_eq!(state(&j), "stopped", "{j:#}");
    assert!(root
        .join("jobs/early/output/early/state.safetensors")
        .is_file());
}

#[test]
fn caption_endpoints_come_from_the_flags_then_ui_toml() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let toml = "[[caption_endpoint]]\nurl = \"http://127.0.0.1:9/v1\"\nkey_env = \"LORAKIT_UI_TOML_TEST_KEY\"\n";
    std::fs::write(root.join("ui.toml"), toml).unwrap();
    // the key's variable must be set, or the start stops and names it
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(["ui", "--root", root.to_str().unwrap(), "--port", "0"])
        .env("LORAKIT_UI_TOKEN", TOKEN)
        .env_remove("LORAKIT_UI_TOML_TEST_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("LORAKIT_UI_TOML_TEST_KEY") && err.contains("not set"),
        "{err}"
    );
    let key = [("LORAKIT_UI_TOML_TEST_KEY", "sk-from-env")];
    let ui = start_ui_env(
        &root,
        &["--caption-endpoint", "http://127.0.0.1:8/v1"],
        &key,
    );
    let (_, list) = call(&ui, "GET", "/api/caption-endpoints", None);
    assert_eq!(
        list,
        serde_json::json!([
            {"id": "1", "url": "http://127.0.0.1:8/v1", "key_env": null},
            {"id": "2", "url": "http://127.0.0.1:9/v1", "key_env": "LORAKIT_UI_TOML_TEST_KEY"},
        ])
    );
    // a misspelt key stops the start, naming the file and the key
    std::fs::write(
        root.join("ui.toml"),
        "[[caption_endpoint]]\nurl = \"http://a/v1\"\napi_key = \"x\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(["ui", "--root", root.to_str().unwrap(), "--port", "0"])
        .env("LORAKIT_UI_TOKEN", TOKEN)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ui.toml") && err.contains("api_key"), "{err}");
}
