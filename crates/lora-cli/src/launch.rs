//! `lorakit train job.toml --nproc N`: starts N ranks of one data-parallel
//! run on this machine, as `torchrun --nproc-per-node N` would: each is
//! this binary's `lorakit train` with torchrun's variables (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`), in a process group of its own so that one Ctrl-C is
//! forwarded to every rank exactly once. When a rank fails, the launcher
//! names it and ends the others.

use crate::AnyResult;
use lora_sdxl::dist::DistEnv;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the other ranks may take to notice a failed one (their
/// collectives fail at once when its connections close) before they are
/// killed.
const GRACE: Duration = Duration::from_secs(30);

fn spawn(
    job: &Path,
    resume: bool,
    quiet: bool,
    rank: usize,
    n: usize,
    port: u16,
) -> AnyResult<Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg(job);
    if resume {
        cmd.arg("--resume");
    }
    if quiet {
        cmd.arg("--quiet");
    }
    cmd.envs(DistEnv::local(rank, n, port).child_vars());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // SAFETY: prctl is async-signal-safe; it runs in the child before exec.
    // A rank whose launcher dies stops as after Ctrl-C (saving its state).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

/// Runs the ranks to the end; the exit code is 0 only when all succeeded.
pub fn launch(job: &Path, resume: bool, quiet: bool, n: usize) -> AnyResult<ExitCode> {
    let port = lora_sdxl::dist::free_port()?;
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        match spawn(job, resume, quiet, rank, n, port) {
            Ok(c) => children.push(c),
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                }
                return Err(format!("could not start rank {rank} of {n}: {e}").into());
            }
        }
    }
    let pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
    let presses = Arc::new(AtomicUsize::new(0));
    let seen = presses.clone();
    // the ranks stop at the same step after one Ctrl-C (they agree on it)
    // and abort after a second: forward each press once to each rank
    let _ = ctrlc::set_handler(move || {
        seen.fetch_add(1, Ordering::SeqCst);
        for &pid in &pids {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
    });
    crate::console::deliver_ctrl_c();
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    let mut failed: Option<(usize, ExitStatus, Instant)> = None;
    while status.iter().any(Option::is_none) {
        for (rank, c) in children.iter_mut().enumerate() {
            if status[rank].is_none() {
                if let Some(s) = c.try_wait()? {
                    status[rank] = Some(s);
                    if !s.success() && failed.is_none() {
                        failed = Some((rank, s, Instant::now()));
                    }
                }
            }
        }
        if let Some((_, _, at)) = failed {
            if at.elapsed() > GRACE {
                for (rank, c) in children.iter_mut().enumerate() {
                    if status[rank].is_none() {
                        let _ = c.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        None => Ok(ExitCode::SUCCESS),
        Some((rank, s, _)) => Err(format!(
            "rank {rank} of {n} {}; the run stopped on every rank (the last checkpoint and state.safetensors are kept; `lorakit train {} --nproc {n} --resume` continues)",
            crate::console::describe_exit(s),
            job.display()
        )
        .into()),
    }
}
