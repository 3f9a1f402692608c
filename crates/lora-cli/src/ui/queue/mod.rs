//! The queue of GPU work: one process at a time, first in first out,
//! persisted in `jobs/queue.json`. An entry is a training run (`lorakit
//! train job.toml [--resume]`, output in the job's `log.txt`, progress
//! read from the run's `events.jsonl`) or a Compare grid (`lorakit grid …`
//! into the job's `compare/`): a grid and a run never share the device
//! (issue 26). Each is a child process, so a crash cannot take the UI down.
//!
//! The queue cannot get stuck: a run whose process is gone is settled from
//! its exit status (or, for a run the UI re-attached to after a restart,
//! from its last event), and the next queued job starts. A UI restart finds
//! runs it started still alive and follows them, and marks the others
//! interrupted (resumable).

use lora_sdxl::train::Event;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

mod liveness;
#[cfg(test)]
mod tests;

use liveness::liveness;
pub use liveness::Liveness;

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

/// What an entry runs. A job has at most one entry of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `lorakit train jobs/<job>/job.toml [--resume]`.
    #[default]
    Train,
    /// `lorakit grid <args>` writing into `jobs/<job>/compare/`.
    Grid,
}

/// One job's place in the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The job's name (its folder under `jobs/`).
    pub job: String,
    /// A training run or a grid (absent in a queue file from before grids: a run).
    #[serde(default)]
    pub kind: Kind,
    /// Where it stands.
    pub state: State,
    /// A run: continue from the saved state.
    pub resume: bool,
    /// The process while it runs.
    pub pid: Option<u32>,
    /// Why it failed: the last lines of its log.
    pub error: Option<String>,
    /// A grid: the arguments after `lorakit grid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

impl Entry {
    /// A new entry waiting for its turn.
    fn queued(job: &str, kind: Kind, resume: bool, args: Vec<String>) -> Self {
        Self {
            job: job.to_string(),
            kind,
            state: State::Queued,
            resume,
            pid: None,
            error: None,
            args,
        }
    }

    /// The path its process's command line names: the job file of a run,
    /// the output folder of a grid (how a pid is told to be ours).
    fn marker(&self, jobs_dir: &Path) -> PathBuf {
        let dir = jobs_dir.join(&self.job);
        match self.kind {
            Kind::Train => dir.join("job.toml"),
            Kind::Grid => dir.join("compare"),
        }
    }

    /// Where its process writes its output.
    fn log(&self, jobs_dir: &Path) -> PathBuf {
        let dir = jobs_dir.join(&self.job);
        match self.kind {
            Kind::Train => dir.join("log.txt"),
            Kind::Grid => dir.join("compare").join("log.txt"),
        }
    }
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

/// The last event in a run's `events.jsonl`, read through the trainer's type.
fn last_event(run_dir: &Path) -> Option<Event> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).ok()?;
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str(line).ok()
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Queue {
    /// The queue of `jobs_dir` (read back from `queue.json`); `exe` is the
    /// `lorakit` binary runs are started with. Entries left `running` by an
    /// earlier UI are followed when their process is alive, else marked
    /// interrupted.
    pub fn open(jobs_dir: &Path, exe: PathBuf) -> Self {
        let mut entries: Vec<Entry> = std::fs::read(jobs_dir.join("queue.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for e in &mut entries {
            let marker = e.marker(jobs_dir);
            // only what was running is asked about (a pid check and a /proc read)
            let dead = || e.pid.is_none_or(|p| liveness(p, &marker) == Liveness::Dead);
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

    /// The training entry of `job`.
    pub fn entry(&self, job: &str) -> Option<Entry> {
        self.entry_of(job, Kind::Train)
    }

    /// The entry of `job` of that kind.
    pub fn entry_of(&self, job: &str, kind: Kind) -> Option<Entry> {
        let inner = self.lock();
        inner
            .entries
            .iter()
            .find(|e| e.job == job && e.kind == kind)
            .cloned()
    }

    /// Queues a run of `job` (to continue from its state when `resume`).
    /// Refused while it is queued or running.
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
        let train = |e: &Entry| e.job == job && e.kind == Kind::Train;
        inner
            .entries
            .retain(|e| !train(e) || matches!(e.state, State::Queued | State::Running));
        if inner.entries.iter().any(train) {
            return Err(format!("{job:?} is already queued or running"));
        }
        if let Err(e) = prepare() {
            return Ok(Err(e));
        }
        inner
            .entries
            .push(Entry::queued(job, Kind::Train, resume, Vec::new()));
        self.save(&inner);
        Ok(Ok(()))
    }

    /// Queues a grid of `job` (`lorakit grid <args>`) behind whatever is
    /// queued, so it never shares the device with a run. A previous grid
    /// of the job leaves the queue first; a running one is killed and
    /// reaped before `prepare` (which rewrites its `compare/` folder) runs.
    /// The outer error: the previous grid would not end.
    pub fn enqueue_grid<E>(
        &self,
        job: &str,
        args: Vec<String>,
        prepare: impl FnOnce() -> Result<(), E>,
    ) -> Result<Result<(), E>, String> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let old = (inner.entries.iter()).position(|e| e.job == job && e.kind == Kind::Grid);
        if let Some(i) = old {
            if let (State::Running, Some(pid)) = (inner.entries[i].state, inner.entries[i].pid) {
                let marker = inner.entries[i].marker(&self.jobs_dir);
                end_process(pid, inner.child.take(), &marker)?;
            }
            inner.entries.remove(i);
            self.save(inner);
        }
        if let Err(e) = prepare() {
            return Ok(Err(e));
        }
        inner
            .entries
            .push(Entry::queued(job, Kind::Grid, false, args));
        self.save(inner);
        Ok(Ok(()))
    }

    /// Stops `job`'s run. A queued one leaves the queue. A running one is
    /// asked as Ctrl-C asks (it finishes the step, saves a checkpoint and
    /// its state, then exits); asked a second time it aborts without
    /// saving, as a second Ctrl-C does; a third time its process group is
    /// killed (a run hung in a driver call answers no signal). Says which
    /// it did.
    pub fn stop(&self, job: &str) -> Result<&'static str, String> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let run = (inner.entries.iter_mut()).find(|e| e.job == job && e.kind == Kind::Train);
        let Some(e) = run else {
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
                    _ => kill_group(pid),
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

    /// Forgets `job`'s run and grid (refused while either is queued or running).
    pub fn remove(&self, job: &str) -> Result<(), String> {
        let mut inner = self.lock();
        let busy = |e: &Entry| e.job == job && matches!(e.state, State::Queued | State::Running);
        if let Some(e) = inner.entries.iter().find(|e| busy(e)) {
            return Err(match e.kind {
                Kind::Train => format!("{job:?} is queued or running: stop it first"),
                Kind::Grid => format!("a grid of {job:?} is queued or rendering: wait for it"),
            });
        }
        inner.entries.retain(|e| e.job != job);
        self.save(&inner);
        Ok(())
    }

    /// One turn of the runner: settles an entry whose process ended, then
    /// starts the next queued one when nothing runs. Called every half
    /// second by the UI's runner task.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(i) = inner.entries.iter().position(|e| e.state == State::Running) {
            // Some(Ok) ended well, Some(Err(why)) ended badly, None still runs.
            // A run a second or third Stop ended (exit 130: aborted without
            // saving; SIGKILL) ended as asked: interrupted, not failed.
            let asked = inner.stops > 1;
            let ended: Option<Result<(), String>> = match &mut inner.child {
                Some(c) => match c.try_wait() {
                    Ok(Some(status)) if status.success() || (asked && aborted(status)) => {
                        Some(Ok(()))
                    }
                    Ok(Some(status)) => Some(Err(format!(
                        "the run {}",
                        crate::console::describe_exit(status)
                    ))),
                    Ok(None) => None,
                    Err(e) => Some(Err(format!("its exit status is unknown: {e}"))),
                },
                // Re-attached after a restart: no exit status, only the pid.
                None => {
                    let marker = inner.entries[i].marker(&self.jobs_dir);
                    let dead = (inner.entries[i].pid)
                        .is_none_or(|p| liveness(p, &marker) == Liveness::Dead);
                    dead.then_some(Ok(()))
                }
            };
            let Some(ended) = ended else { return };
            inner.child = None;
            let e = &mut inner.entries[i];
            e.pid = None;
            let run_dir = self.jobs_dir.join(&e.job).join("output").join(&e.job);
            e.state = match (&ended, e.kind) {
                (Err(_), _) => State::Failed,
                (Ok(()), Kind::Grid) => State::Done,
                (Ok(()), Kind::Train) => match last_event(&run_dir) {
                    Some(Event::Finished { .. }) => State::Done,
                    Some(Event::Stopped { .. }) => State::Stopped,
                    _ => State::Interrupted,
                },
            };
            if let Err(why) = ended {
                // the log's last lines, then how the process ended (a crash
                // prints nothing of its own)
                e.error = Some(format!("{}\n{why}", tail(&e.log(&self.jobs_dir), 12)));
            }
            self.save(inner);
            return;
        }
        let Some(i) = inner.entries.iter().position(|e| e.state == State::Queued) else {
            return;
        };
        match self.spawn(&inner.entries[i]) {
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
                tracing::warn!(
                    "cannot start {} yet, will retry: {why}",
                    inner.entries[i].job
                );
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

    /// `lorakit train jobs/<job>/job.toml [--resume]` or `lorakit grid
    /// <args>`, output appended to the entry's log. No shell: the
    /// arguments go to the program as they are. An error says whether it
    /// is transient (out of descriptors or processes): then the entry is
    /// tried again at the next turn.
    fn spawn(&self, e: &Entry) -> Result<Child, (String, bool)> {
        let dir = self.jobs_dir.join(&e.job);
        let log_path = e.log(&self.jobs_dir);
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
        match e.kind {
            Kind::Train => {
                cmd.arg("train").arg(dir.join("job.toml"));
                if e.resume {
                    cmd.arg("--resume");
                }
            }
            Kind::Grid => {
                cmd.arg("grid").args(&e.args);
            }
        }
        // Its own process group: a Ctrl-C of the UI does not stop it, and
        // a restarted UI follows it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // SIGINT blocked until the run has installed its Ctrl-C handler
        // (`console::stop_on_ctrl_c` unblocks it): a Stop pressed while it
        // starts then stops it after its first step instead of killing it
        // (stop 36: "Resume" then "Stop" at once left a failed job).
        // SAFETY: the closure only changes the signal mask, which is
        // async-signal-safe between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                crate::console::mask_sigint(libc::SIG_BLOCK)
            });
        }
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

/// Whether a run ended as a second or third Stop ends it: exit 130 (its
/// Ctrl-C handler aborting without saving) or SIGKILL.
fn aborted(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.code() == Some(130) || status.signal() == Some(libc::SIGKILL)
}

/// SIGKILL to the process group `pid` leads, or to the process alone when
/// it leads none.
fn kill_group(pid: libc::pid_t) {
    // SAFETY: signals to a process (group) this queue started.
    unsafe {
        if libc::kill(-pid, libc::SIGKILL) != 0 {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Kills the process `pid` and returns once it is gone: reaped when it is
/// our `child`, else (re-attached after a restart) watched until its pid no
/// longer names `marker`, for at most 10 s.
fn end_process(pid: u32, child: Option<Child>, marker: &Path) -> Result<(), String> {
    kill_group(pid as libc::pid_t);
    if let Some(mut c) = child {
        return c
            .wait()
            .map(drop)
            .map_err(|e| format!("process {pid}: {e}"));
    }
    let t0 = std::time::Instant::now();
    while liveness(pid, marker) != Liveness::Dead {
        if t0.elapsed().as_secs() >= 10 {
            return Err(format!(
                "the previous grid (process {pid}) does not end; try again in a moment"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}
