//! `lorakit sample` and `lorakit grid`.

use crate::AnyResult;
use clap::Args;
use lora_sdxl::sample::grid::{
    attach_all, checkpoint_columns, parameters_text, render_grid, software, Column, GridRequest,
    LoraUse,
};
use lora_sdxl::sample::txt2img::{txt2img, GenerateParams};
use lora_sdxl::{ClipTokenizer, SamplerSpec, SdxlModel};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tch::{Device, Kind};

/// Settings shared by `sample` and `grid`.
#[derive(Args, Debug)]
pub struct Common {
    /// The SDXL checkpoint (.safetensors) or diffusers folder.
    #[arg(long)]
    model: PathBuf,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed (same seed, same starting noise as ComfyUI's KSampler).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Sampler steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// CFG scale.
    #[arg(long, default_value_t = 7.0)]
    cfg: f64,
    /// euler, euler_ancestral, dpmpp_2m, dpmpp_2m_karras, ddim (`_karras` selects Karras σs).
    #[arg(long, default_value = "euler")]
    sampler: String,
    /// Width (multiple of 8).
    #[arg(long, default_value_t = 1024)]
    width: u32,
    /// Height (multiple of 8).
    #[arg(long, default_value_t = 1024)]
    height: u32,
    /// cpu, cuda, cuda:N (default: CUDA when available).
    #[arg(long)]
    device: Option<String>,
    /// Weights dtype: fp16, bf16, fp32 (default fp16 on CUDA, fp32 on CPU).
    /// The VAE always decodes in fp32 or bf16.
    #[arg(long)]
    dtype: Option<String>,
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    #[command(flatten)]
    common: Common,
    /// A LoRA to apply, `FILE` or `FILE:STRENGTH` (default strength 1); repeat for several.
    #[arg(long = "lora")]
    loras: Vec<String>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Images (image i starts from slice i of one seeded draw, as in ComfyUI).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Output folder.
    #[arg(long, default_value = "samples")]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct GridArgs {
    #[command(flatten)]
    common: Common,
    /// LoRA checkpoints to compare (columns, ordered by step).
    #[arg(long, num_args = 1.., required = true)]
    loras: Vec<PathBuf>,
    /// One strength for every column (default 1, or use --strengths).
    #[arg(long, conflicts_with = "strengths")]
    strength: Option<f64>,
    /// Several strengths (comma-separated): columns become checkpoint × strength.
    #[arg(long, value_delimiter = ',')]
    strengths: Vec<f64>,
    /// A text file with one prompt per line (blank lines and `#` comments skipped).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// A prompt (repeatable; added after the file's).
    #[arg(long = "prompt")]
    prompt: Vec<String>,
    /// Add a first column without any LoRA.
    #[arg(long)]
    with_base: bool,
    /// Output folder.
    #[arg(long, default_value = "grid")]
    out: PathBuf,
}

impl Common {
    fn params(&self, prompt: &str, batch: usize) -> AnyResult<GenerateParams> {
        let sampler: SamplerSpec = self
            .sampler
            .parse()
            .map_err(|e| format!("--sampler: {e}"))?;
        let p = GenerateParams {
            prompt: prompt.to_string(),
            negative: self.negative.clone(),
            steps: self.steps,
            cfg: self.cfg,
            sampler,
            seed: self.seed,
            width: self.width,
            height: self.height,
            batch_size: batch,
        };
        p.validate().map_err(|e| format!("--{e}"))?;
        Ok(p)
    }

    fn load(&self) -> AnyResult<(SdxlModel, String)> {
        let device = lora_sdxl::model::sdxl::resolve_device(self.device.as_deref())
            .map_err(|e| format!("--device: {e}"))?;
        let kind = match (self.dtype.as_deref(), device) {
            (Some(name), _) => crate::lora::dtype_kind(name)?,
            (None, Device::Cuda(_)) => Kind::Half,
            (None, _) => Kind::Float,
        };
        let model = SdxlModel::load(&self.model, kind, device)?;
        let name = self
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok((model, name))
    }
}

/// `FILE[:STRENGTH]`: the suffix after the last `:` is a strength when it
/// parses as a number (so `C:\x.safetensors` and `a:b.safetensors` stay paths).
pub(crate) fn parse_lora(arg: &str) -> AnyResult<LoraUse> {
    if let Some((path, s)) = arg.rsplit_once(':') {
        if let Ok(strength) = s.parse::<f64>() {
            if !strength.is_finite() {
                return Err(format!("--lora {arg}: strength must be a number").into());
            }
            return Ok(LoraUse {
                path: path.into(),
                strength,
            });
        }
    }
    Ok(LoraUse {
        path: arg.into(),
        strength: 1.0,
    })
}

/// The next free `NNNNN-<seed>.png` number in `dir` (A1111's naming).
fn next_index(dir: &Path) -> u32 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.split('-').next()?.parse::<u32>().ok()
                })
                .max()
                .map_or(0, |m| m + 1)
        })
        .unwrap_or(0)
}

pub fn sample(args: SampleArgs, quiet: bool) -> AnyResult<ExitCode> {
    let params = args.common.params(&args.prompt, args.batch)?;
    let loras = args
        .loras
        .iter()
        .map(|l| parse_lora(l))
        .collect::<AnyResult<Vec<_>>>()?;
    for l in &loras {
        if !l.path.is_file() {
            return Err(format!("--lora: {} does not exist", l.path.display()).into());
        }
    }
    let (model, model_name) = args.common.load()?;
    let hashes = attach_all(&model, &loras)?;
    let tok = ClipTokenizer::new();
    let pb = crate::console::progress_bar(params.steps as u64, "sampler steps", quiet);
    let images = txt2img(&model, &tok, &params, &mut |_| {
        if let Some(b) = &pb {
            b.inc(1)
        }
    })?;
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let text = parameters_text(&params, &model_name, &loras, &hashes);
    let first = next_index(&args.out);
    for (i, img) in images.iter().enumerate() {
        let path = args
            .out
            .join(format!("{:05}-{}.png", first + i as u32, params.seed));
        lora_sdxl::render::save_png(
            &path,
            img,
            &[("parameters", &text), ("software", &software())],
        )?;
        if !quiet {
            println!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_prompts(args: &GridArgs) -> AnyResult<Vec<String>> {
    let mut prompts = Vec::new();
    if let Some(f) = &args.prompts {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("--prompts {}: {e}", f.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
    }
    prompts.extend(args.prompt.iter().cloned());
    if prompts.is_empty() {
        return Err("no prompts: pass --prompts FILE (one per line) or --prompt TEXT".into());
    }
    Ok(prompts)
}

pub fn grid(args: GridArgs, quiet: bool) -> AnyResult<ExitCode> {
    let prompts = read_prompts(&args)?;
    let base = args.common.params("", 1)?;
    for f in &args.loras {
        if !f.is_file() {
            return Err(format!("--loras: {} does not exist", f.display()).into());
        }
    }
    let strengths = match (args.strength, args.strengths.is_empty()) {
        (Some(s), _) => vec![s],
        (None, false) => args.strengths.clone(),
        (None, true) => vec![1.0],
    };
    if let Some(s) = strengths.iter().find(|s| !s.is_finite()) {
        return Err(format!("--strengths: {s} is not a number").into());
    }
    let mut columns = Vec::new();
    if args.with_base {
        columns.push(Column {
            label: "no LoRA".into(),
            loras: Vec::new(),
        });
    }
    columns.extend(checkpoint_columns(&args.loras, &strengths));
    let (model, model_name) = args.common.load()?;
    let tok = ClipTokenizer::new();
    let total = (prompts.len() * columns.len() * base.steps) as u64;
    if !quiet {
        println!(
            "rendering {} prompt(s) × {} column(s) = {} images",
            prompts.len(),
            columns.len(),
            prompts.len() * columns.len()
        );
    }
    let pb = crate::console::progress_bar(total, "sampler steps", quiet);
    let out = render_grid(
        &model,
        &tok,
        GridRequest {
            model_name: &model_name,
            prompts: &prompts,
            columns: &columns,
            base: &base,
            out_dir: &args.out,
        },
        &mut |done, _| {
            if let Some(b) = &pb {
                b.set_position(done)
            }
        },
    )?;
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    if !quiet {
        println!(
            "wrote {} ({} images beside it)",
            out.grid.display(),
            prompts.len() * columns.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_argument_forms() {
        let l = parse_lora("out/a_000000100.safetensors:0.8").unwrap();
        assert_eq!(l.path, PathBuf::from("out/a_000000100.safetensors"));
        assert_eq!(l.strength, 0.8);
        let l = parse_lora("a.safetensors").unwrap();
        assert_eq!(l.strength, 1.0);
        let l = parse_lora("C:\\loras\\a.safetensors").unwrap();
        assert_eq!(l.path, PathBuf::from("C:\\loras\\a.safetensors"));
        let l = parse_lora("x.safetensors:-0.5").unwrap();
        assert_eq!(l.strength, -0.5);
    }
}
