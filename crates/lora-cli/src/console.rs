//! What the commands share on the terminal: progress bars and Ctrl-C.

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
    stop
}
