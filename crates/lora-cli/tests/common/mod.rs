//! What the `lorakit ui` tests share: the UI as a child process, the runs
//! it starts killed at the end, and a root with a tiny model and dataset.
// Each test crate uses a different part of this file.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const TOKEN: &str = "ui-jobs-test-token-0001";

pub struct UiProcess {
    child: Child,
    pub base: String,
}

impl Drop for UiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every run the queue of `root` lists when the test ends, passing
/// or not: runs live in their own process group and would outlive the UI.
pub struct KillRuns(pub PathBuf);

impl Drop for KillRuns {
    fn drop(&mut self) {
        let queue = std::fs::read(self.0.join("jobs/queue.json")).unwrap_or_default();
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&queue).unwrap_or_default();
        for pid in entries.iter().filter_map(|e| e["pid"].as_u64()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

pub fn start_ui(root: &Path) -> UiProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args([
            "ui",
            "--root",
            root.to_str().unwrap(),
            "--port",
            "0",
            "--token",
            TOKEN,
        ])
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    UiProcess { child, base }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
}

/// Creates `root` with `models/tiny.safetensors` and the dataset
/// `datasets/chars` (4 images); the guard kills the runs its queue starts.
pub fn setup(root: &Path) -> KillRuns {
    std::fs::create_dir_all(root.join("models")).unwrap();
    lora_sdxl::synthetic::write_random_checkpoint(
        &root.join("models/tiny.safetensors"),
        &lora_sdxl::SdxlConfig::tiny(),
        1,
        tch::Kind::Half,
    )
    .unwrap();
    lora_data::synthetic::write_character_dataset(
        &root.join("datasets/chars"),
        4,
        256,
        256,
        "trig",
        1,
    )
    .unwrap();
    KillRuns(root.to_path_buf())
}
