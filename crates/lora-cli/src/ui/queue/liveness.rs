//! Whether a run's process still lives, as far as the UI can tell: a pid
//! alone is not enough (it may be reused), and a failure to ask is not a
//! death (issue 26: a flood of sockets made a live run look dead).

use std::path::Path;

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
pub fn liveness(pid: u32, job_file: &Path) -> Liveness {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

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
