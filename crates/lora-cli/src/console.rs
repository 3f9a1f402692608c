//! What the commands share on the terminal: progress bars and Ctrl-C.

use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A progress bar on stderr counting `unit`s, with rate and ETA; `None`
/// with `--quiet` or when stderr is not a terminal (logs stay clean).
pub fn progress_bar(total: u64, unit: &str, quiet: bool) -> Option<indicatif::ProgressBar> {
    (!quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{bar:30}} {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

/// A flag the first Ctrl-C sets (printing `first`); a second Ctrl-C prints
/// `second` and exits with 130 at once. Every file lorakit writes is written
/// atomically, so neither leaves a half-written file.
pub fn stop_on_ctrl_c(first: &'static str, second: &'static str) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let presses = AtomicUsize::new(0);
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("\n{first}");
            flag.store(true, Ordering::SeqCst);
        } else {
            eprintln!("\n{second}");
            std::process::exit(130);
        }
    });
    deliver_ctrl_c();
    stop
}

/// Unblocks SIGINT in this thread, once a Ctrl-C handler is installed: the
/// UI starts runs with it blocked (`ui/queue`), so a Stop that came while
/// the run was starting is delivered now, to the handler, instead of
/// killing the run before it could save anything.
pub fn deliver_ctrl_c() {
    let _ = mask_sigint(libc::SIG_UNBLOCK);
}

/// Blocks (`libc::SIG_BLOCK`) or unblocks (`libc::SIG_UNBLOCK`) SIGINT in
/// the calling thread. Async-signal-safe, so a child may call it between
/// fork and exec (the UI's queue blocks it there for its runs).
pub fn mask_sigint(how: libc::c_int) -> std::io::Result<()> {
    // SAFETY: signal-set and signal-mask calls on a local set, all
    // async-signal-safe.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// What a child's exit status says, for messages about a run or rank that
/// ended badly: "exited with status 1", "was killed by signal 11 (SIGSEGV)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = match s {
                libc::SIGINT => " (SIGINT)",
                libc::SIGABRT => " (SIGABRT: an abort, e.g. a C++ exception nobody caught)",
                libc::SIGKILL => " (SIGKILL: killed, e.g. by the out-of-memory killer)",
                libc::SIGSEGV => " (SIGSEGV: a crash)",
                libc::SIGBUS => " (SIGBUS: a crash)",
                libc::SIGTERM => " (SIGTERM)",
                _ => "",
            };
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("was killed by signal {s}{name}{core}")
        }
        _ => "ended".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::describe_exit;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn an_exit_status_is_described_with_its_code_or_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "exited with status 1"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGSEGV)),
            "was killed by signal 11 (SIGSEGV: a crash)"
        );
    }
}
