//! Helpers shared by the training tests (`mod common;`).

use lora_sdxl::{JobConfig, SdxlConfig};
use std::path::{Path, PathBuf};

/// Writes a tiny SDXL-architecture checkpoint (random weights, seed 11) and a
/// synthetic character dataset of `images` 256² images with the trigger
/// `myaku` under `root`; returns their paths.
pub fn tiny_model_and_dataset(root: &Path, images: usize) -> (PathBuf, PathBuf) {
    let model = root.join("tiny.safetensors");
    lora_sdxl::synthetic::write_random_checkpoint(
        &model,
        &SdxlConfig::tiny(),
        11,
        tch::Kind::Float,
    )
    .unwrap();
    let data = root.join("data");
    lora_data::synthetic::write_character_dataset(&data, images, 256, 256, "myaku", 5).unwrap();
    (model, data)
}

/// `root/job.toml` written from the `lorakit init` template for `model` and
/// `data` (trigger `myaku`), and the job loaded from it.
#[allow(dead_code)] // not every test file uses every helper
pub fn template_job(root: &Path, model: &Path, data: &Path) -> (JobConfig, PathBuf) {
    let path = root.join("job.toml");
    std::fs::write(
        &path,
        JobConfig::template(model.to_str(), data.to_str(), Some("myaku")),
    )
    .unwrap();
    (JobConfig::load(&path).unwrap(), path)
}
