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
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The link it printed: `http://127.0.0.1:PORT/?token=…`.
    pub link: String,
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

/// `lorakit ui --root ROOT --port 0 EXTRA…` with the token [`TOKEN`] in
/// `LORAKIT_UI_TOKEN`, once it has printed its link.
pub fn start_ui(root: &Path, extra: &[&str]) -> UiProcess {
    start_ui_env(root, extra, &[])
}

/// [`start_ui`] with these environment variables set too.
pub fn start_ui_env(root: &Path, extra: &[&str], env: &[(&str, &str)]) -> UiProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(["ui", "--root", root.to_str().unwrap(), "--port", "0"])
        .args(extra)
        .envs(env.iter().copied())
        .env("LORAKIT_UI_TOKEN", TOKEN)
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let link = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(link.ends_with(&format!("/?token={TOKEN}")), "{line}");
    let base = link.split("/?").next().unwrap().to_string();
    UiProcess { child, base, link }
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

/// A tiny fp32 CPU job `DIR/NAME.toml` on `DIR/tiny.safetensors` and 4
/// images of `res`² in `DIR/data` (both written once): the template with
/// `steps`, a checkpoint every `save_every`, `batch` images per step,
/// accumulation 1, one validation image, then `edits` (exact replacements).
pub fn tiny_job(
    dir: &Path,
    name: &str,
    res: u32,
    (steps, save_every, batch): (u64, u64, usize),
    edits: &[(&str, &str)],
) -> PathBuf {
    let model = dir.join("tiny.safetensors");
    let data = dir.join("data");
    if !model.exists() {
        lora_sdxl::synthetic::write_random_checkpoint(
            &model,
            &lora_sdxl::SdxlConfig::tiny(),
            1,
            tch::Kind::Float,
        )
        .unwrap();
        lora_data::synthetic::write_character_dataset(&data, 4, res, res, "trig", 1).unwrap();
    }
    let mut text =
        lora_sdxl::JobConfig::template(model.to_str(), data.to_str(), Some("trig"), None)
            .replace("name = \"trig\"", &format!("name = \"{name}\""))
            .replace("steps = 3000", &format!("steps = {steps}"))
            .replace("save_every = 100", &format!("save_every = {save_every}"))
            .replace("batch_size = 2", &format!("batch_size = {batch}"))
            .replace("resolution = [512, 768]", &format!("resolution = [{res}]"))
            .replace("dtype = \"bf16\"", "dtype = \"fp32\"")
            .replace("gradient_accumulation = 2", "gradient_accumulation = 1")
            .replace("# device = \"cuda\"", "device = \"cpu\"")
            .replace("# images = 4", "images = 1");
    for (from, to) in edits {
        assert!(text.contains(from), "{from} is not in the template");
        text = text.replace(from, to);
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}
