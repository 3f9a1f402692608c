//! Helpers shared by the training tests (`mod common;`).

use lora_sdxl::SdxlConfig;
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
