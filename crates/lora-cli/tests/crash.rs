//! Crash safety of `lorakit train`: killed with SIGKILL at many moments
//! (before the first save, mid-step, while a checkpoint or the state is
//! being written), a run leaves only complete files under their final names
//! and `--resume` continues from the last complete state; a second run on the
//! same folder is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

/// A tiny job that saves at every step (so kills often land in a write).
fn tiny_job(dir: &Path, steps: u64) -> PathBuf {
    common::tiny_job(dir, "trig", 256, (steps, 1, 2), &[])
}

fn spawn_train(job: &Path, resume: bool) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    c.args(["--quiet", "train", job.to_str().unwrap()]);
    if resume {
        c.arg("--resume");
    }
    c.env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every `.safetensors` file under a final name reads completely; the state,
/// when there is one, names a step whose checkpoint exists.
fn assert_consistent(run: &Path) {
    let Ok(entries) = std::fs::read_dir(run) else {
        return; // killed before the folder existed
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            lora_core::io::read_tensors(e.path())
                .unwrap_or_else(|err| panic!("{name} is not complete: {err}"));
        }
    }
    let state = run.join("state.safetensors");
    if state.exists() {
        let md = lora_core::io::read_tensors(&state).unwrap().metadata;
        let step: u64 = md["lorakit.step"].parse().unwrap();
        let ckpt = run.join(format!("trig_{step:09}.safetensors"));
        let last = run.join("trig.safetensors");
        assert!(
            ckpt.exists() || last.exists(),
            "state at step {step} without its checkpoint"
        );
    }
}

#[test]
fn sigkill_at_any_moment_leaves_a_resumable_run() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job(dir.path(), 10);
    let run = dir.path().join("output/trig");
    // the first kill comes before any save; later ones land mid-step or mid-write
    for delay_ms in [300u64, 1300, 1900, 2500, 3100, 3700] {
        let mut child = spawn_train(&job, true);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        assert_consistent(&run);
    }
    // then it runs to the end from the last complete state (on a fast
    // machine the restarts between kills may already have finished it; a
    // resume of a finished run is refused, which is right)
    let o = spawn_train(&job, true).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let done_before =
        err.contains("already reached step 10") && run.join("trig.safetensors").is_file();
    assert!(o.status.success() || done_before, "{err}");
    assert_consistent(&run);
    let last = lora_core::io::read_tensors(run.join("trig.safetensors"))
        .unwrap()
        .metadata;
    assert_eq!(last["ss_steps"], "10");
    // no step is logged twice, however often the run was killed
    let csv = std::fs::read_to_string(run.join("loss.csv")).unwrap();
    let steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1).is_some_and(|v| !v.is_empty()))
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "steps repeat in loss.csv: {csv}"
    );
    assert_eq!(steps.last(), Some(&10), "{csv}");
    // no temp file of an interrupted write is left behind
    let temps: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn a_second_run_on_the_same_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job(dir.path(), 400);
    let mut first = spawn_train(&job, false);
    let csv = dir.path().join("output/trig/loss.csv");
    let t0 = Instant::now();
    while !csv.exists() {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = spawn_train(&job, true).wait_with_output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("another training run is using"), "{err}");
}
