//! Data-parallel `lorakit train --nproc N` on the CPU (Gloo over
//! 127.0.0.1): two ranks × batch 1 train the LoRA one process × batch 2
//! trains; a killed rank ends the run with an error naming it; a two-rank
//! run stopped by Ctrl-C resumes (here in one process with the same
//! effective batch) to the LoRA of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

/// A tiny fp32 job named `name` with `batch` images per rank and `steps`
/// steps, a checkpoint every `save_every` (saved in fp32), and `edits` of
/// the template's text.
fn job_with(
    dir: &Path,
    name: &str,
    batch: usize,
    (steps, save_every): (u64, u64),
    edits: &[(&str, &str)],
) -> PathBuf {
    let mut all = vec![
        ("lr = 0.00007", "lr = 0.001"),
        ("dtype = \"fp16\"", "dtype = \"fp32\""),
    ];
    all.extend_from_slice(edits);
    common::tiny_job(dir, name, 128, (steps, save_every, batch), &all)
}

fn job(dir: &Path, name: &str, batch: usize, steps: u64, save_every: u64) -> PathBuf {
    job_with(dir, name, batch, (steps, save_every), &[])
}

fn lorakit(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    c.args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env("LORAKIT_DIST_TIMEOUT", "60")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn ok(o: Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// Every tensor of the final LoRA of run `name`, by key.
fn lora(dir: &Path, name: &str) -> Vec<(String, Vec<f32>)> {
    let file = dir.join(format!("output/{name}/{name}.safetensors"));
    let mut t: Vec<(String, Vec<f32>)> = lora_core::io::read_tensors(&file)
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                Vec::<f32>::try_from(v.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap(),
            )
        })
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The largest difference between two LoRAs relative to the largest value,
/// and that largest value of the `lora_up` weights (zero before training).
fn compare(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut top, mut up) = (0f32, 0f32, 0f32);
    for ((ka, va), (kb, vb)) in a.iter().zip(b) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            diff = diff.max((x - y).abs());
            top = top.max(x.abs());
            if ka.contains("lora_up") {
                up = up.max(x.abs());
            }
        }
    }
    (diff / top, up)
}

/// One process × batch 2 with 1 and 2 threads (`{tag}_t1`, `{tag}_t2`)
/// and 2 ranks × batch 1 (`{tag}_two`), 4 steps with `edits`: the 2 ranks'
/// LoRA's largest difference from the 1-thread one relative to its
/// largest weight, the noise floor (1 vs 2 threads: the order of the
/// float sums alone), and the largest `lora_up` value.
fn ranks_against_one(dir: &Path, tag: &str, edits: &[(&str, &str)]) -> (f32, f32, f32, String) {
    for threads in ["1", "2"] {
        let name = format!("{tag}_t{threads}");
        let one = job_with(dir, &name, 2, (4, 4), edits);
        ok(lorakit(&["train", one.to_str().unwrap()])
            .env("OMP_NUM_THREADS", threads)
            .output()
            .unwrap());
    }
    let (floor, _) = compare(
        &lora(dir, &format!("{tag}_t1")),
        &lora(dir, &format!("{tag}_t2")),
    );
    let two = job_with(dir, &format!("{tag}_two"), 1, (4, 4), edits);
    let err = ok(lorakit(&["train", two.to_str().unwrap(), "--nproc", "2"])
        .output()
        .unwrap());
    let (rel, up) = compare(
        &lora(dir, &format!("{tag}_t1")),
        &lora(dir, &format!("{tag}_two")),
    );
    eprintln!("{tag}: relative difference: 2 ranks {rel:e}, 1 vs 2 threads {floor:e}");
    (rel, floor, up, err)
}

#[test]
fn two_ranks_of_batch_1_train_what_one_process_of_batch_2_trains() {
    let dir = tempfile::tempdir().unwrap();
    // the noise floor (1 vs 2 threads) measured: 2.7e-5 of the largest
    // weight after 4 AdamW steps at lr 1e-3
    let (rel, floor, up, err) = ranks_against_one(dir.path(), "plain", &[]);
    assert!(up > 1e-4, "the LoRA did not train: max |lora_up| = {up}");
    // the bound is 4 × the floor this run measures (1 vs 2 threads), never
    // under 1e-6: 2 ranks differ by 3.7e-5 against a floor of 2.7e-5 (the
    // same with OMP_NUM_THREADS=1; 2.9e-5 against 2.4e-5 with MKL, oneDNN
    // and ATen held to AVX2 / no SIMD): 1.4 × the floor, so 2.9 × under
    // the bound
    assert!(
        rel < 4.0 * floor + 1e-6,
        "2 ranks × batch 1 differ from 1 × batch 2 by {rel:e} (relative), above the float noise floor {floor:e}\n{err}"
    );
    // rank 0 alone wrote the run: one events log that finished once, and
    // the notes say how the batch was split
    let events = std::fs::read_to_string(dir.path().join("output/plain_two/events.jsonl")).unwrap();
    assert!(events.contains("data-parallel: rank 0 of 2"), "{events}");
    let finished = events
        .lines()
        .filter(|l| l.contains("\"finished\""))
        .count();
    assert_eq!(finished, 1, "{events}");
}

/// The same with LoRA dropouts (issue 28, item 10): neuron and rank
/// dropout masks are drawn for the global batch and sliced per rank, and
/// module dropout is a host draw every rank makes alike (the modules it
/// leaves out lose the zeros the all-reduce gave them), so 2 ranks × 1
/// still train what 1 × 2 trains. Before, every rank drew masks for its
/// own rows from the same seed, so rank 1's rows reused rank 0's masks.
#[test]
fn two_ranks_equal_one_process_with_dropouts() {
    let dir = tempfile::tempdir().unwrap();
    let edits = [
        ("\ndropout = 0.0 ", "\ndropout = 0.25 "),
        ("rank_dropout = 0.0 ", "rank_dropout = 0.5 "),
        ("module_dropout = 0.0 ", "module_dropout = 0.25 "),
    ];
    let (rel, floor, up, err) = ranks_against_one(dir.path(), "drop", &edits);
    assert!(up > 1e-4, "the LoRA did not train: max |lora_up| = {up}");
    // the bound of the test above: 4 × the floor this run measures
    assert!(
        rel < 4.0 * floor + 1e-6,
        "with dropouts, 2 ranks × batch 1 differ from 1 × batch 2 by {rel:e} (relative), above the float noise floor {floor:e}\n{err}"
    );
}

/// The pid of rank `rank` among the launcher's children (by its RANK).
fn rank_pid(launcher: u32, rank: usize) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
    children.split_whitespace().find_map(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let wanted = format!("RANK={rank}");
        env.split(|&b| b == 0)
            .any(|kv| kv == wanted.as_bytes())
            .then(|| pid.parse().ok())?
    })
}

/// Waits until `path` exists (the run got that far), at most `limit`.
fn wait_for(path: &Path, child: &mut Child, limit: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {}",
            path.display()
        );
        assert!(t0.elapsed() < limit, "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_rank_ends_the_run_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = job(dir.path(), "killed", 1, 500, 1);
    let mut run = lorakit(&["train", path.to_str().unwrap(), "--nproc", "2"])
        .spawn()
        .unwrap();
    wait_for(
        &dir.path()
            .join("output/killed/killed_000000001.safetensors"),
        &mut run,
        Duration::from_secs(120),
    );
    let pid = rank_pid(run.id(), 1).expect("rank 1 is running");
    // SAFETY: a child of the launcher this test started
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    let o = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "took {:?}",
        t0.elapsed()
    );
    assert!(err.contains("rank 1 of 2 was killed by signal 9"), "{err}");
    assert!(
        err.contains("rank 0 of 2:") && err.contains("failed"),
        "{err}"
    );
    assert!(dir.path().join("output/killed/state.safetensors").exists());
}

#[test]
fn a_two_rank_ctrl_c_resumes_in_one_process_to_the_same_lora() {
    let dir = tempfile::tempdir().unwrap();
    let full = job(dir.path(), "full", 1, 10, 1);
    ok(lorakit(&["train", full.to_str().unwrap(), "--nproc", "2"])
        .output()
        .unwrap());

    let part = job(dir.path(), "part", 1, 10, 1);
    let out = dir.path().join("output");
    // a Ctrl-C that reaches rank 1 alone: both ranks stop at the same step
    let mut run = lorakit(&["train", part.to_str().unwrap(), "--nproc", "2"])
        .spawn()
        .unwrap();
    wait_for(
        &out.join("part/part_000000002.safetensors"),
        &mut run,
        Duration::from_secs(120),
    );
    let rank1 = rank_pid(run.id(), 1).expect("rank 1 is running");
    // SAFETY: a rank of the launcher this test started
    unsafe { libc::kill(rank1, libc::SIGINT) };
    let err = ok(run.wait_with_output().unwrap());
    let stopped = saved_step(&out.join("part"));
    assert!((2..8).contains(&stopped), "stopped at {stopped}\n{err}");
    copy_dir(&out.join("part"), &out.join("single"));
    copy_dir(&out.join("part"), &out.join("single_t1"));

    // resumed on two ranks and stopped again by a Ctrl-C to the launcher
    // (which forwards it once to each rank), then resumed to the end:
    // exactly the uninterrupted run
    let resume = || lorakit(&["train", part.to_str().unwrap(), "--nproc", "2", "--resume"]);
    let mut run = resume().spawn().unwrap();
    let next = out.join(format!("part/part_{:09}.safetensors", stopped + 1));
    wait_for(&next, &mut run, Duration::from_secs(120));
    // SAFETY: the launcher this test started
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    let err = ok(run.wait_with_output().unwrap());
    let again = saved_step(&out.join("part"));
    assert!(
        (stopped + 1..10).contains(&again),
        "stopped at {again}\n{err}"
    );
    ok(resume().output().unwrap());
    assert_eq!(
        lora(dir.path(), "full"),
        lora(dir.path(), "part"),
        "resumed after steps {stopped} and {again}"
    );

    // the same effective batch in one process (batch 2, no --nproc): the
    // same LoRA to the float noise floor, measured here as in the test
    // above by resuming the same state with 1 and with 2 threads. The bound
    // is 4 × that floor, never under 1e-6. Measured on the 2-core dev
    // machine: one process against the two ranks 1.6e-5 with a floor of
    // 2.2e-5; with MKL / oneDNN / ATen held to AVX2 1.4e-5 against 1.3e-5:
    // at most 1.05 × the floor, so the bound holds with a margin of 3.8.
    let mut resumed = Vec::new();
    for (name, threads) in [("single", "2"), ("single_t1", "1")] {
        let single = job(dir.path(), name, 2, 10, 1);
        let err = ok(lorakit(&["train", single.to_str().unwrap(), "--resume"])
            .env("OMP_NUM_THREADS", threads)
            .output()
            .unwrap());
        assert!(!err.contains("planned anew"), "{err}");
        resumed.push(lora(dir.path(), name));
    }
    let (floor, _) = compare(&resumed[0], &resumed[1]);
    let (rel, up) = compare(&lora(dir.path(), "full"), &resumed[0]);
    assert!(up > 1e-4, "max |lora_up| = {up}");
    eprintln!("relative difference: one process {rel:e}, 1 vs 2 threads {floor:e}");
    assert!(
        rel < 4.0 * floor + 1e-6,
        "resumed after step {stopped} in one process: relative difference {rel:e}, above the float noise floor {floor:e}"
    );
}

/// The step of a run's state, which must record the global batch of 2.
fn saved_step(run: &Path) -> u64 {
    let state = lora_core::io::read_tensors(run.join("state.safetensors")).unwrap();
    assert_eq!(state.metadata["lorakit.global_batch"], "2");
    state.metadata["lorakit.step"].parse().unwrap()
}

/// Copies a run folder (files only, as a run has them).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
