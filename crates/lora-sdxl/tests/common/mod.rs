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
        JobConfig::template(model.to_str(), data.to_str(), Some("myaku"), None),
    )
    .unwrap();
    (JobConfig::load(&path).unwrap(), path)
}

/// A quick CPU job on `model`/`data` named `name`: rank 4 (no LoCon), fp32,
/// 256 px, batch 2 without accumulation, 2 steps at lr 1e-3, fp32 files,
/// under `root/out`.
#[allow(dead_code)]
pub fn small_cpu_job(root: &Path, model: &Path, data: &Path, name: &str) -> (JobConfig, PathBuf) {
    let (mut c, path) = template_job(root, model, data);
    c.job.name = name.into();
    c.job.device = Some("cpu".into());
    c.job.output_dir = root.join("out");
    c.network.linear = 4;
    c.network.linear_alpha = 4.0;
    c.train.steps = 2;
    c.train.batch_size = 2;
    c.train.gradient_accumulation = 1;
    c.train.lr = 1e-3;
    c.train.dtype = "fp32".into();
    c.save.dtype = "fp32".into();
    c.datasets[0].resolution = vec![256];
    (c, path)
}

/// Training options without console output.
#[allow(dead_code)]
pub fn quiet() -> lora_sdxl::train::TrainOptions {
    lora_sdxl::train::TrainOptions {
        quiet: true,
        ..Default::default()
    }
}

/// A safetensors file's tensors sorted by name.
#[allow(dead_code)]
pub fn sorted_tensors(p: &Path) -> Vec<(String, tch::Tensor)> {
    let mut t = lora_core::io::read_tensors(p).unwrap().tensors;
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// The tensors of `tests/fixtures/<name>` by name.
#[allow(dead_code)]
pub fn fixture_tensors(name: &str) -> std::collections::HashMap<String, tch::Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    lora_core::io::read_tensors(path)
        .unwrap()
        .tensors
        .into_iter()
        .collect()
}
