//! The job queue: one training run at a time, first in first out,
//! persisted in `jobs/queue.json`. A run is a child process
//! (`lorakit train job.toml [--resume]`), so a crashing run cannot take the
//! UI down; its output goes to the job's `log.txt`, its progress is read
//! from the run's `events.jsonl`.
//!
//! The queue cannot get stuck: a run whose process is gone is settled from
//! its exit status (or, for a run the UI re-attached to after a restart,
//! from its last event), and the next queued job starts. A UI restart finds
//! runs it started still alive and follows them, and marks the others
//! interrupted (resumable).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its turn.
    Queued,
    /// Its process runs.
    Running,
    /// `train.steps` reached.
    Done,
    /// Stopped on request; checkpoint and state saved (resumable).
    Stopped,
    /// The process ended with an error (see the log).
    Failed,
    /// The process vanished (the UI or machine went down); resumable.
    Interrupted,
}

/// One job's place in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The job's name (its folder under `jobs/`).
    pub job: String,
    /// Where it stands.
    pub state: State,
    /// Continue from the saved state.
    pub resume: bool,
    /// The process while it runs.
    pub pid: Option<u32>,
    /// Why it failed: the last lines of its log.
    pub error: Option<String>,
}

/// The queue and the process it runs.
pub struct Queue {
    jobs_dir: PathBuf,
    exe: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: Vec<Entry>,
    /// The child we started (absent for a run re-attached after a restart).
    child: Option<Child>,
    /// Stop requests sent to the running run so far (see [`Queue::stop`]).
    stops: u32,
}

/// Whether a run's process lives, as far as this process can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// A live `lorakit train` of this job.
    Alive,
    /// Gone, or the pid now belongs to another program.
    Dead,
    /// Cannot tell (no descriptor left to read `/proc`, no permission):
    /// never taken for a death, which would start the next run beside it.
    Unknown,
}

/// Whether `pid` is a live `lorakit train` of this job: signal 0 checks
/// that it exists, and on Linux its command line must name the job file (a
/// pid reused by another program after the run ended does not count).
fn liveness(pid: u32, job_file: &Path) -> Liveness {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let exists = match unsafe { libc::kill(pid as libc::pid_t, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    let cmdline = || std::fs::read(format!("/proc/{pid}/cmdline"));
    judge(exists, cmdline, job_file, Path::new("/proc/self").exists())
}

/// [`liveness`]' rule, on what the system answered.
fn judge(
    exists: std::io::Result<()>,
    cmdline: impl FnOnce() -> std::io::Result<Vec<u8>>,
    job_file: &Path,
    have_proc: bool,
) -> Liveness {
    match exists {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Liveness::Dead,
        Err(_) => return Liveness::Unknown,
        Ok(()) => {}
    }
    match cmdline() {
        Ok(cmd) => {
            let want = job_file.as_os_str().as_encoded_bytes();
            match cmd.windows(want.len().max(1)).any(|w| w == want) {
                true => Liveness::Alive,
                false => Liveness::Dead,
            }
        }
        // it ended between the two questions
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && have_proc => Liveness::Dead,
        // no /proc (not Linux): the signal is all there is
        Err(_) if !have_proc => Liveness::Alive,
        Err(_) => Liveness::Unknown,
    }
}

/// The last event name in a run's `events.jsonl` (`finished`, `stopped`, …).
pub fn last_event(run_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).ok()?;
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["event"].as_str().map(str::to_string)
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Queue {
    /// The queue of `jobs_dir` (read back from `queue.json`); `exe` is the
    /// `lorakit` binary runs are started with. Runs left `running` by an
    /// earlier UI are followed when their process is alive, else marked
    /// interrupted.
    pub fn open(jobs_dir: &Path, exe: PathBuf) -> Self {
        let mut entries: Vec<Entry> = std::fs::read(jobs_dir.join("queue.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for e in &mut entries {
            let file = jobs_dir.join(&e.job).join("job.toml");
            // only a run that was running is asked about (a pid check and a /proc read)
            let dead = || e.pid.is_none_or(|p| liveness(p, &file) == Liveness::Dead);
            if e.state == State::Running && dead() {
                e.state = State::Interrupted;
                e.pid = None;
            }
        }
        let q = Self {
            jobs_dir: jobs_dir.to_path_buf(),
            exe,
            inner: Mutex::new(Inner {
                entries,
                child: None,
                stops: 0,
            }),
        };
        q.save(&q.lock());
        q
    }

    /// The queue's state; a panic in an earlier turn (caught by the runner)
    /// does not lock it for good: the entries are saved after each change,
    /// so what the guard holds is consistent.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, inner: &Inner) {
        if let Ok(text) = serde_json::to_vec_pretty(&inner.entries) {
            if let Err(e) = lora_core::io::write_atomic(self.jobs_dir.join("queue.json"), &text) {
                tracing::error!("cannot save the job queue: {e}");
            }
        }
    }

    /// Every entry, in queue order.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    /// The entry of `job`.
    pub fn entry(&self, job: &str) -> Option<Entry> {
        self.entries().into_iter().find(|e| e.job == job)
    }

    /// Queues `job` (to continue from its state when `resume`). Refused
    /// while it is queued or running.
    pub fn enqueue(&self, job: &str, resume: bool) -> Result<(), String> {
        let none = || Ok::<(), std::convert::Infallible>(());
        self.enqueue_after(job, resume, none).map(|_| ())
    }

    /// [`Queue::enqueue`], with `prepare` (say, writing the job's new step
    /// count) run under the queue's lock once the job is known to be
    /// neither queued nor running: a refused job keeps its files as they
    /// were. The outer error is that refusal, the inner one `prepare`'s.
    pub fn enqueue_after<E>(
        &self,
        job: &str,
        resume: bool,
        prepare: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<(), E>, String> {
        let mut inner = self.lock();
        inner
            .entries
            .retain(|e| e.job != job || matches!(e.state, State::Queued | State::Running));
        if inner.entries.iter().any(|e| e.job == job) {
            return Err(format!("{job:?} is already queued or running"));
        }
        if let Err(e) = prepare() {
            return Ok(Err(e));
        }
        inner.entries.push(Entry {
            job: job.to_string(),
            state: State::Queued,
            resume,
            pid: None,
            error: None,
        });
        self.save(&inner);
        Ok(Ok(()))
    }

    /// Stops `job`. A queued one leaves the queue. A running one is asked
    /// as Ctrl-C asks (it finishes the step, saves a checkpoint and its
    /// state, then exits); asked a second time it aborts without saving, as
    /// a second Ctrl-C does; a third time its process group is killed (a
    /// run hung in a driver call answers no signal). Says which it did.
    pub fn stop(&self, job: &str) -> Result<&'static str, String> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(e) = inner.entries.iter_mut().find(|e| e.job == job) else {
            return Err(format!("{job:?} is not in the queue"));
        };
        let done = match (e.state, e.pid) {
            (State::Running, Some(pid)) => {
                inner.stops += 1;
                let pid = pid as libc::pid_t;
                match inner.stops {
                    1 | 2 => {
                        // SAFETY: a signal to the run's own process, as Ctrl-C would send.
                        unsafe { libc::kill(pid, libc::SIGINT) };
                    }
                    // SAFETY: the run's own process group (it leads it), or
                    // the process alone when it leads none.
                    _ => unsafe {
                        if libc::kill(-pid, libc::SIGKILL) != 0 {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    },
                }
                match inner.stops {
                    1 => "asked to stop: it saves a checkpoint and its state, then exits",
                    2 => "asked again: it aborts without saving (Stop once more kills it)",
                    _ => "killed",
                }
            }
            (State::Queued, _) => {
                e.state = State::Stopped;
                "taken off the queue"
            }
            _ => return Err(format!("{job:?} is not running")),
        };
        self.save(inner);
        Ok(done)
    }

    /// Forgets `job` (refused while it is queued or running).
    pub fn remove(&self, job: &str) -> Result<(), String> {
        let mut inner = self.lock();
        if inner
            .entries
            .iter()
            .any(|e| e.job == job && matches!(e.state, State::Queued | State::Running))
        {
            return Err(format!("{job:?} is queued or running: stop it first"));
        }
        inner.entries.retain(|e| e.job != job);
        self.save(&inner);
        Ok(())
    }

    /// One turn of the runner: settles a run whose process ended, then
    /// starts the next queued job when nothing runs. Called every half
    /// second by the UI's runner task.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(i) = inner.entries.iter().position(|e| e.state == State::Running) {
            let ended = match &mut inner.child {
                Some(c) => match c.try_wait() {
                    Ok(Some(status)) => Some(status.success()),
                    Ok(None) => None,
                    Err(_) => Some(false),
                },
                // Re-attached after a restart: no exit status, only the pid.
                None => {
                    let file = self.jobs_dir.join(&inner.entries[i].job).join("job.toml");
                    let dead =
                        (inner.entries[i].pid).is_none_or(|p| liveness(p, &file) == Liveness::Dead);
                    dead.then_some(true)
                }
            };
            let Some(ok) = ended else { return };
            inner.child = None;
            let job = inner.entries[i].job.clone();
            let dir = self.jobs_dir.join(&job);
            let e = &mut inner.entries[i];
            e.pid = None;
            e.state = match (ok, last_event(&dir.join("output").join(&job)).as_deref()) {
                (true, Some("finished")) => State::Done,
                (true, Some("stopped")) => State::Stopped,
                (true, _) => State::Interrupted,
                (false, _) => State::Failed,
            };
            if e.state == State::Failed {
                e.error = Some(tail(&dir.join("log.txt"), 12));
            }
            self.save(inner);
            return;
        }
        let Some(i) = inner.entries.iter().position(|e| e.state == State::Queued) else {
            return;
        };
        let (job, resume) = (inner.entries[i].job.clone(), inner.entries[i].resume);
        match self.spawn(&job, resume) {
            Ok(child) => {
                let e = &mut inner.entries[i];
                e.state = State::Running;
                e.pid = Some(child.id());
                e.error = None;
                inner.child = Some(child);
                inner.stops = 0;
            }
            // Out of descriptors or processes for now: the job stays queued.
            Err((why, true)) => {
                tracing::warn!("cannot start {job} yet, will retry: {why}");
                return;
            }
            Err((why, false)) => {
                let e = &mut inner.entries[i];
                e.state = State::Failed;
                e.error = Some(why);
            }
        }
        self.save(inner);
    }

    /// `lorakit train jobs/<job>/job.toml [--resume]`, output appended to
    /// the job's `log.txt`. No shell: the arguments go to the program as they are.
    /// An error says whether it is transient (out of descriptors or
    /// processes): then the job is tried again at the next turn.
    fn spawn(&self, job: &str, resume: bool) -> Result<Child, (String, bool)> {
        let dir = self.jobs_dir.join(job);
        let log_path = dir.join("log.txt");
        let fail = |what: &Path, e: std::io::Error| {
            let transient = matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN)
            );
            (format!("{}: {e}", what.display()), transient)
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| fail(&log_path, e))?;
        let err = log.try_clone().map_err(|e| fail(&log_path, e))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("train").arg(dir.join("job.toml"));
        if resume {
            cmd.arg("--resume");
        }
        // Its own process group: a Ctrl-C of the UI does not stop the run,
        // and a restarted UI follows it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .current_dir(&dir)
            .spawn()
            .map_err(|e| {
                let (why, transient) = fail(&self.exe, e);
                (format!("cannot start {why}"), transient)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

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

    #[test]
    fn a_run_that_cannot_be_checked_is_not_taken_for_dead() {
        let job = Path::new("/r/jobs/a/job.toml");
        let ours = || Ok(b"lorakit\0train\0/r/jobs/a/job.toml\0".to_vec());
        let other = || Ok(b"bash\0".to_vec());
        let emfile = || Err(Error::from_raw_os_error(libc::EMFILE));
        let gone = || Err(Error::from(ErrorKind::NotFound));
        let esrch = || Err(Error::from_raw_os_error(libc::ESRCH));
        assert_eq!(judge(Ok(()), ours, job, true), Liveness::Alive);
        assert_eq!(
            judge(Ok(()), other, job, true),
            Liveness::Dead,
            "pid reused"
        );
        assert_eq!(judge(esrch(), ours, job, true), Liveness::Dead);
        assert_eq!(judge(Ok(()), gone, job, true), Liveness::Dead);
        // out of descriptors (issue 26: a flood of idle sockets made a
        // training run look dead and the next one start beside it)
        assert_eq!(judge(Ok(()), emfile, job, true), Liveness::Unknown);
        let eperm = Err(Error::from_raw_os_error(libc::EPERM));
        assert_eq!(judge(eperm, ours, job, true), Liveness::Unknown);
        assert_eq!(judge(Ok(()), emfile, job, false), Liveness::Alive);
        // this process is alive and is not a run of that job
        let me = std::process::id();
        assert_eq!(liveness(me, job), Liveness::Dead);
        let exe = std::env::current_exe().unwrap();
        assert_eq!(liveness(me, &exe), Liveness::Alive);
    }
}
