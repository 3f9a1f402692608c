//! The toy-world base model: a tiny SDXL-architecture checkpoint
//! ([`SdxlConfig::toy_world`](crate::SdxlConfig::toy_world), real
//! single-file layout, fp16, ~20 MB) trained from scratch on
//! [`lora_data::toy_world`] by `make toy-world`
//! (`scripts/fixtures/toy_world.py`). It draws 64 px scenes from captions
//! like `red circle, large, in the center, night` and has never seen the
//! demo character, so a LoRA trained on it visibly teaches a concept; the
//! demo, the quality tests and `examples/compare_grid` use it.
//!
//! ```no_run
//! use lora_sdxl::toy_world;
//! use lora_sdxl::{ClipTokenizer, SdxlModel};
//! let model = SdxlModel::load(toy_world::asset_path(), tch::Kind::Float, tch::Device::Cpu)?;
//! let tok = ClipTokenizer::new();
//! let seen = toy_world::detect(&model, &tok, &toy_world::params("red circle, large, in the center, sky"), 4)?;
//! let red = seen.iter().filter(|a| a.colour.is_some_and(|c| c.0 == "red")).count();
//! println!("{red} of 4 samples have a red shape");
//! # Ok::<(), lora_sdxl::SdxlError>(())
//! ```

use crate::error::Result;
use crate::model::sdxl::SdxlModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::sample::txt2img::{txt2img, GenerateParams};
use crate::train::job::{JobConfig, JobError, SampleSection};
use lora_data::toy_world::{analyse, Analysis, SIZE};
use std::path::{Path, PathBuf};

/// The demo character's trigger word.
pub const TRIGGER: &str = "myakumyaku-san";

/// The demo's grid rows: the trigger on three backgrounds its dataset
/// ([`lora_data::synthetic::write_character_dataset`]) does not have, then
/// a world prompt without it (no concept bleed: it must stay a green square).
pub const GRID_PROMPTS: [&str; 4] = [
    "[trigger], large, in the center, sky",
    "[trigger], small, on the left, night",
    "[trigger], beach",
    "green square, large, in the center, beach",
];

/// Where the committed toy-world checkpoint lies in the source tree
/// (`crates/lora-sdxl/assets/toy_world.safetensors`).
pub fn asset_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/toy_world.safetensors")
}

/// The sampling settings the toy world is checked with: 64 × 64,
/// `dpmpp_2m_karras`, 20 steps, CFG 5, empty negative prompt, seed 1.
pub fn params(prompt: &str) -> GenerateParams {
    GenerateParams {
        prompt: prompt.into(),
        negative: String::new(),
        steps: 20,
        cfg: 5.0,
        sampler: "dpmpp_2m_karras".parse().unwrap_or_default(),
        seed: 1,
        width: SIZE,
        height: SIZE,
        batch_size: 1,
    }
}

/// The demo's job on the toy base: the `lorakit init` template for
/// `model`, `data` and [`TRIGGER`] with LoRA rank 8 (conv 4), 500 steps at
/// lr 3e-3, 64 px, fp32 on CPU, a checkpoint and a sample round of
/// [`GRID_PROMPTS`] (strength 0.8, fixed seed) every 50 steps, written
/// under `out/demo/`. The quality tests train with it too.
pub fn character_job(
    job_path: &Path,
    model: &Path,
    data: &Path,
    out: &Path,
) -> Result<JobConfig, JobError> {
    let mut job = JobConfig::parse(
        job_path,
        &JobConfig::template(model.to_str(), data.to_str(), Some(TRIGGER), None),
    )?;
    job.job.name = "demo".into();
    job.job.output_dir = out.to_path_buf();
    job.job.device = Some("cpu".into());
    job.network.linear = 8;
    job.network.linear_alpha = 8.0;
    job.network.conv = 4;
    job.network.conv_alpha = 4.0;
    job.save.save_every = 50;
    // the body comes by step 100, the blue hat on top from about 300
    job.train.steps = 500;
    job.train.lr = 3e-3;
    job.train.dtype = "fp32".into();
    // A tiny model on CPU has memory to spare: no recomputation.
    job.train.gradient_checkpointing = false.into();
    job.datasets[0].resolution = vec![SIZE];
    job.validation.images = Some(4);
    let s = &mut job.sample;
    s.disable = false;
    s.sample_every = 50;
    s.prompts = GRID_PROMPTS.iter().map(|p| p.to_string()).collect();
    let p = params("");
    s.negative_prompt = p.negative;
    s.sampler = "dpmpp_2m_karras".into();
    s.sample_steps = p.steps as u32;
    s.guidance_scale = p.cfg;
    (s.width, s.height) = (p.width, p.height);
    s.strength = 0.8;
    Ok(job)
}

/// Generates `n` images of `params` (one seeded draw of `n` noises, with
/// whatever LoRAs are attached to `model`) and analyses each with the
/// toy-world detector.
pub fn detect(
    model: &SdxlModel,
    tok: &ClipTokenizer,
    params: &GenerateParams,
    n: usize,
) -> Result<Vec<Analysis>> {
    let p = GenerateParams {
        batch_size: n,
        ..params.clone()
    };
    let images = tch::no_grad(|| txt2img(model, tok, &p, &mut |_| {}))?;
    Ok(images.iter().map(analyse).collect())
}

/// The share of `seen` for which `f` holds (0 for none seen), e.g.
/// `share(&seen, Analysis::has_character)`.
pub fn share(seen: &[Analysis], f: impl Fn(&Analysis) -> bool) -> f64 {
    seen.iter().filter(|a| f(a)).count() as f64 / seen.len().max(1) as f64
}

/// The share of `seen` with the demo character.
pub fn character_rate(seen: &[Analysis]) -> f64 {
    share(seen, Analysis::has_character)
}

/// What the toy-world detector sees in one sample round of [`GRID_PROMPTS`]:
/// over the three trigger rows, the share of samples with the character's
/// orange body and with the whole character (the body and the blue hat
/// above it); over the row without the trigger, the share with the body or
/// the character (bleed) and the share that keeps its green square.
///
/// One round of 8 samples per row is noisy (a checkpoint's character rate
/// moves by ±0.2 with the sampling seed); [`Scores::mean`] averages rounds
/// over checkpoints and seeds, which the quality test and
/// `examples/toy_world_spread.rs` do.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Scores {
    /// Trigger rows: share with the body.
    pub body: f64,
    /// Trigger rows: share with the whole character.
    pub character: f64,
    /// The row without the trigger: share with the body.
    pub bleed_body: f64,
    /// The row without the trigger: share with the whole character.
    pub bleed_character: f64,
    /// The row without the trigger: share whose shape is its green square.
    pub green_square: f64,
}

impl Scores {
    /// Samples [`GRID_PROMPTS`] with `sample`'s settings (sampler, steps,
    /// CFG, size, seed), `n` samples per row, through `model` with whatever
    /// LoRAs are attached to it, and scores them.
    pub fn of(
        model: &SdxlModel,
        tok: &ClipTokenizer,
        sample: &SampleSection,
        n: usize,
    ) -> Result<Scores> {
        let sampler = (sample.sampler.parse()).map_err(|reason| crate::SdxlError::Param {
            name: "sample.sampler",
            reason,
        })?;
        let rows: Vec<GenerateParams> = (GRID_PROMPTS.iter())
            .map(|p| sample.generate_params(sampler, p, Some(TRIGGER)))
            .collect();
        let mut with = Vec::new();
        for p in &rows[..3] {
            with.extend(detect(model, tok, p, n)?);
        }
        let without = detect(model, tok, &rows[3], n)?;
        Ok(Scores {
            body: share(&with, Analysis::has_body),
            character: character_rate(&with),
            bleed_body: share(&without, Analysis::has_body),
            bleed_character: character_rate(&without),
            green_square: share(&without, |a| a.colour.is_some_and(|c| c.0 == "green")),
        })
    }

    /// The mean of each share over `rounds` (all zero for none).
    pub fn mean(rounds: &[Scores]) -> Scores {
        let n = rounds.len().max(1) as f64;
        let sum = |f: fn(&Scores) -> f64| rounds.iter().map(f).sum::<f64>() / n;
        Scores {
            body: sum(|s| s.body),
            character: sum(|s| s.character),
            bleed_body: sum(|s| s.bleed_body),
            bleed_character: sum(|s| s.bleed_character),
            green_square: sum(|s| s.green_square),
        }
    }
}
