//! The queue's own tests (the UI's HTTP tests are in `ui/tests/`).

use super::*;

#[test]
fn a_panic_under_the_lock_does_not_stop_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let q = Queue::open(tmp.path(), PathBuf::from("/nonexistent/lorakit"));
    // a bug in a turn of the runner, caught by it, poisons the lock
    std::thread::scope(|s| {
        let r = s.spawn(|| {
            let _held = q.lock();
            panic!("a bug in tick");
        });
        assert!(r.join().is_err());
    });
    assert!(q.inner.is_poisoned());
    // issue 26: the queue went on panicking for good; now it carries on
    q.enqueue("a", false).unwrap();
    assert_eq!(q.entry("a").map(|e| e.state), Some(State::Queued));
    let caught = super::super::caught("test", || -> u8 { panic!("boom") });
    assert_eq!(caught, Err("boom".to_string()));
    assert_eq!(super::super::caught("test", || 7), Ok(7));
}

#[test]
fn stop_asks_twice_then_kills_a_run_that_does_not_listen() {
    let tmp = tempfile::tempdir().unwrap();
    let q = Queue::open(tmp.path(), PathBuf::from("/nonexistent/lorakit"));
    // a "run" that ignores Ctrl-C, in its own process group as runs are
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' INT; echo ready; sleep 60 & wait"]);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut ready = String::new();
    let out = child.stdout.take().unwrap();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut ready).unwrap();
    assert_eq!(ready, "ready\n");
    q.enqueue("hung", false).unwrap();
    {
        let mut inner = q.lock();
        inner.entries[0].state = State::Running;
        inner.entries[0].pid = Some(child.id());
    }
    let wait = |child: &mut Child, secs: u64| {
        let t0 = std::time::Instant::now();
        while t0.elapsed().as_secs() < secs {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    assert!(q.stop("hung").unwrap().starts_with("asked to stop"));
    assert!(!wait(&mut child, 1), "it ignores SIGINT");
    assert!(q.stop("hung").unwrap().starts_with("asked again"));
    assert!(!wait(&mut child, 1));
    // issue 26: Stop was SIGINT only, so a hung run could not be stopped
    assert_eq!(q.stop("hung").unwrap(), "killed");
    assert!(wait(&mut child, 10), "the run was not killed");
}

/// A stand-in for the `lorakit` binary: it notes `<command> <pid>` in
/// `calls`, then runs until the file `release-<command>` exists.
fn fake_lorakit(dir: &Path) -> PathBuf {
    let d = dir.display();
    script_lorakit(
        dir,
        &format!("echo \"$1 $$\" >> {d}/calls\nwhile [ ! -e {d}/release-$1 ]; do sleep 0.05; done"),
    )
}

/// Ticks the queue until `done` holds (at most 30 s).
fn tick_until(q: &Queue, what: &str, done: impl Fn(&Queue) -> bool) {
    let t0 = std::time::Instant::now();
    while !done(q) {
        assert!(t0.elapsed().as_secs() < 30, "gave up waiting: {what}");
        q.tick();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn state_of(q: &Queue, job: &str, kind: Kind) -> Option<State> {
    q.entry_of(job, kind).map(|e| e.state)
}

#[test]
fn a_grid_waits_for_the_run_and_the_next_run_for_the_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    for job in ["a", "b"] {
        std::fs::create_dir_all(jobs.join(job).join("compare")).unwrap();
    }
    let q = Queue::open(&jobs, fake_lorakit(tmp.path()));
    let calls = || std::fs::read_to_string(tmp.path().join("calls")).unwrap_or_default();
    q.enqueue("a", false).unwrap();
    tick_until(&q, "a's run", |q| {
        state_of(q, "a", Kind::Train) == Some(State::Running)
    });
    let ok = || Ok::<(), String>(());
    q.enqueue_grid("a", vec!["--out".into()], ok)
        .unwrap()
        .unwrap();
    q.enqueue("b", false).unwrap();
    for _ in 0..10 {
        q.tick();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // issue 26: a grid rendered beside the running job, on the same GPU
    assert_eq!(state_of(&q, "a", Kind::Grid), Some(State::Queued));
    assert!(!calls().contains("grid"), "{}", calls());
    std::fs::write(tmp.path().join("release-train"), "").unwrap();
    tick_until(&q, "the grid", |q| {
        state_of(q, "a", Kind::Grid) == Some(State::Running)
    });
    assert_eq!(state_of(&q, "a", Kind::Train), Some(State::Interrupted));
    assert_eq!(state_of(&q, "b", Kind::Train), Some(State::Queued));
    assert_eq!(calls().lines().count(), 2, "{}", calls());
    assert!(calls().lines().nth(1).unwrap().starts_with("grid "));
    std::fs::write(tmp.path().join("release-grid"), "").unwrap();
    tick_until(&q, "b's run", |q| {
        state_of(q, "b", Kind::Train) == Some(State::Running)
    });
    assert_eq!(state_of(&q, "a", Kind::Grid), Some(State::Done));
    tick_until(&q, "b's end", |q| {
        state_of(q, "b", Kind::Train) != Some(State::Running)
    });
    // the queue file keeps both kinds
    let reopened = Queue::open(&jobs, PathBuf::from("/nonexistent/lorakit"));
    assert_eq!(state_of(&reopened, "a", Kind::Grid), Some(State::Done));
}

#[test]
fn a_new_grid_ends_the_previous_one_before_its_folder_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    std::fs::create_dir_all(jobs.join("a").join("compare")).unwrap();
    let q = Queue::open(&jobs, fake_lorakit(tmp.path()));
    let ok = || Ok::<(), String>(());
    q.enqueue_grid("a", vec!["first".into()], ok)
        .unwrap()
        .unwrap();
    tick_until(&q, "the first grid", |q| {
        state_of(q, "a", Kind::Grid) == Some(State::Running)
    });
    let pid = q.entry_of("a", Kind::Grid).unwrap().pid.unwrap() as libc::pid_t;
    let gone = || {
        // SAFETY: signal 0 only asks whether the pid exists (a zombie does)
        unsafe { libc::kill(pid, 0) != 0 }
    };
    assert!(!gone());
    let seen = std::cell::Cell::new(None);
    let prepare = || {
        seen.set(Some(gone()));
        Ok::<(), String>(())
    };
    q.enqueue_grid("a", vec!["second".into()], prepare)
        .unwrap()
        .unwrap();
    // issue 26: a second grid left the first one running and deleted the
    // folder it was writing to
    assert_eq!(
        seen.get(),
        Some(true),
        "the first grid still ran (or was not reaped)"
    );
    let e = q.entry_of("a", Kind::Grid).unwrap();
    assert_eq!(
        (e.state, e.args),
        (State::Queued, vec!["second".to_string()])
    );
    assert_eq!(q.lock().entries.len(), 1);
    std::fs::write(tmp.path().join("release-grid"), "").unwrap();
    tick_until(&q, "the second grid's end", |q| {
        state_of(q, "a", Kind::Grid) == Some(State::Done)
    });
}

/// A stand-in `lorakit` in `dir` that runs `script` (sh).
fn script_lorakit(dir: &Path, script: &str) -> PathBuf {
    let exe = dir.join("script-lorakit");
    std::fs::write(&exe, format!("#!/bin/sh\n{script}\n")).unwrap();
    let mut perms = std::fs::metadata(&exe).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&exe, perms).unwrap();
    exe
}

#[test]
fn a_run_that_crashes_is_failed_with_its_signal_named() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    std::fs::create_dir_all(jobs.join("a")).unwrap();
    // a "run" that prints its last words, then crashes as a segfault would
    let exe = script_lorakit(tmp.path(), "echo 'step 4/10'\nkill -SEGV $$");
    let q = Queue::open(&jobs, exe);
    q.enqueue("a", false).unwrap();
    tick_until(&q, "the crash", |q| {
        state_of(q, "a", Kind::Train) == Some(State::Failed)
    });
    // stop 36: a run ended badly after its last line and the page showed
    // only that line, not how the process ended
    let error = q.entry_of("a", Kind::Train).unwrap().error.unwrap();
    assert!(error.starts_with("step 4/10\n"), "{error}");
    assert!(
        error.ends_with("the run was killed by signal 11 (SIGSEGV: a crash)"),
        "{error}"
    );
}

#[test]
fn a_run_stop_kills_is_interrupted_not_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let jobs = tmp.path().join("jobs");
    std::fs::create_dir_all(jobs.join("a")).unwrap();
    // a run that never answers Ctrl-C (its SIGINT stays blocked, as the
    // queue starts runs with it blocked until their handler is in place)
    let exe = script_lorakit(tmp.path(), "echo started\nexec sleep 60");
    let q = Queue::open(&jobs, exe);
    q.enqueue("a", false).unwrap();
    tick_until(&q, "the run", |q| {
        state_of(q, "a", Kind::Train) == Some(State::Running)
    });
    let log = q.entry_of("a", Kind::Train).unwrap().log(&jobs);
    tick_until(&q, "its first line", |_| {
        std::fs::read_to_string(&log).is_ok_and(|t| t == "started\n")
    });
    q.stop("a").unwrap();
    q.stop("a").unwrap();
    for _ in 0..10 {
        q.tick();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        state_of(&q, "a", Kind::Train),
        Some(State::Running),
        "SIGINT is blocked in a run until it asks for it"
    );
    assert_eq!(q.stop("a").unwrap(), "killed");
    tick_until(&q, "the end", |q| {
        state_of(q, "a", Kind::Train) != Some(State::Running)
    });
    // the user asked: a killed run is resumable from its last state, not failed
    let e = q.entry_of("a", Kind::Train).unwrap();
    assert_eq!((e.state, e.error), (State::Interrupted, None));
}
