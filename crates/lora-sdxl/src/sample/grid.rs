//! Comparing LoRAs by generating images: single images with their
//! parameters embedded (A1111 `parameters` PNG chunk), and labelled grids of
//! prompts × columns (checkpoints by step, or strengths), every other
//! parameter fixed. Used by `lorakit sample`, `lorakit grid`, in-training
//! samples and the demo.

use crate::error::{Result, SdxlError};
use crate::model::sdxl::SdxlModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::render::{save_png, Grid};
use crate::sample::txt2img::{txt2img, GenerateParams};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// The text `software` chunk of images lorakit writes.
pub fn software() -> String {
    format!("lorakit {}", env!("CARGO_PKG_VERSION"))
}

/// A LoRA file applied at a strength.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraUse {
    /// The file.
    pub path: PathBuf,
    /// Strength (multiplier).
    pub strength: f64,
}

impl LoraUse {
    /// The name A1111 shows (`<lora:NAME:…>`): the file stem.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn fmt_num(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A1111's `parameters` text: the prompt (with `<lora:name:strength>` tags,
/// as A1111 writes them), `Negative prompt:`, then one line of settings.
/// `lora_hashes` are `(name, addnet hash)` pairs where known.
pub fn parameters_text(
    p: &GenerateParams,
    model_name: &str,
    loras: &[LoraUse],
    lora_hashes: &[(String, String)],
) -> String {
    let mut prompt = p.prompt.clone();
    for l in loras {
        prompt.push_str(&format!(" <lora:{}:{}>", l.name(), fmt_num(l.strength)));
    }
    let (sampler, schedule) = p.sampler.a1111_names();
    let mut line = format!(
        "Steps: {}, Sampler: {sampler}, Schedule type: {schedule}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model_name}",
        p.steps,
        fmt_num(p.cfg),
        p.seed,
        p.width,
        p.height
    );
    if !lora_hashes.is_empty() {
        let h: Vec<String> = lora_hashes
            .iter()
            .map(|(n, h)| format!("{n}: {}", &h[..h.len().min(12)]))
            .collect();
        line.push_str(&format!(", Lora hashes: \"{}\"", h.join(", ")));
    }
    line.push_str(&format!(", Version: {}", software()));
    format!("{prompt}\nNegative prompt: {}\n{line}", p.negative)
}

/// Loads and attaches LoRAs (detaching any attached before). Returns the
/// `(name, sshs_model_hash)` pairs the files' metadata carry.
pub fn attach_all(model: &SdxlModel, loras: &[LoraUse]) -> Result<Vec<(String, String)>> {
    model.detach_loras();
    let mut hashes = Vec::new();
    for l in loras {
        let loaded = lora_core::load_lora(&l.path, lora_core::UnknownKeys::Reject)?;
        if let Some(h) = loaded.metadata.get("sshs_model_hash") {
            hashes.push((l.name(), h.clone()));
        }
        model.attach_lora(loaded.set, l.strength).map_err(|e| {
            SdxlError::Lora(lora_core::LoraError::Invalid(format!(
                "{}: {e}",
                l.path.display()
            )))
        })?;
    }
    Ok(hashes)
}

/// A grid column: a label and the LoRAs it applies (empty: the base model).
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Header text (`step 300`, `strength 0.8`, `no LoRA`).
    pub label: String,
    /// LoRAs applied in this column.
    pub loras: Vec<LoraUse>,
}

/// The step a checkpoint was saved at: from a `<name>_<digits>.safetensors`
/// file name, else the file's `ss_steps` metadata.
pub fn checkpoint_step(path: &Path) -> Option<u64> {
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    if let Some((_, digits)) = stem.rsplit_once('_') {
        if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
            return digits.parse().ok();
        }
    }
    lora_core::io::read_tensors(path)
        .ok()?
        .metadata
        .get("ss_steps")?
        .parse()
        .ok()
}

/// Columns for checkpoints × strengths, ordered by step (files without a
/// step last, by name). Labels: `step N` (plus `@ s` with several strengths).
pub fn checkpoint_columns(files: &[PathBuf], strengths: &[f64]) -> Vec<Column> {
    let mut files: Vec<(Option<u64>, PathBuf)> = files
        .iter()
        .map(|f| (checkpoint_step(f), f.clone()))
        .collect();
    files.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(&y).then(a.1.cmp(&b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(&b.1),
    });
    let mut cols = Vec::new();
    for (step, f) in &files {
        for &s in strengths {
            let mut label = match step {
                Some(n) if files.len() > 1 || strengths.len() == 1 => format!("step {n}"),
                _ => String::new(),
            };
            if label.is_empty() && files.len() > 1 {
                label = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
            }
            if strengths.len() > 1 {
                let st = format!("strength {}", fmt_num(s));
                label = if label.is_empty() {
                    st
                } else {
                    format!("{label} @ {}", fmt_num(s))
                };
            }
            cols.push(Column {
                label,
                loras: vec![LoraUse {
                    path: f.clone(),
                    strength: s,
                }],
            });
        }
    }
    cols
}

/// A file-name-safe slug of a label.
pub fn slug(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches('_').to_string();
    if s.is_empty() {
        "base".into()
    } else {
        s
    }
}

/// What a grid run wrote.
#[derive(Debug, Clone)]
pub struct GridOutput {
    /// The labelled grid image.
    pub grid: PathBuf,
    /// Every individual image, `[row][col]`.
    pub images: Vec<Vec<PathBuf>>,
}

/// What to render in a grid.
#[derive(Debug, Clone, Copy)]
pub struct GridRequest<'a> {
    /// Model name shown in the title and the `Model:` field.
    pub model_name: &'a str,
    /// Rows.
    pub prompts: &'a [String],
    /// Columns.
    pub columns: &'a [Column],
    /// Every other parameter (its `prompt` is replaced per row).
    pub base: &'a GenerateParams,
    /// Where the images and `grid.png` go.
    pub out_dir: &'a Path,
}

/// Renders `prompts` × `columns` into `out_dir`: `c<col>_<label>_p<row>.png`
/// each with its A1111 parameters, and `grid.png`. `progress(done, total)`
/// follows every sampler step. The model's LoRAs are detached afterwards.
pub fn render_grid(
    model: &SdxlModel,
    tok: &ClipTokenizer,
    req: GridRequest<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GridOutput> {
    let GridRequest {
        model_name,
        prompts,
        columns,
        base,
        out_dir,
    } = req;
    if prompts.is_empty() || columns.is_empty() {
        return Err(SdxlError::Param {
            name: "prompts",
            reason: "a grid needs at least one prompt and one column".into(),
        });
    }
    base.validate()?;
    std::fs::create_dir_all(out_dir).map_err(|e| SdxlError::io(out_dir, e))?;
    let total = (prompts.len() * columns.len() * base.steps) as u64;
    let mut done = 0u64;
    let mut cells: Vec<Vec<Option<RgbImage>>> = vec![vec![None; columns.len()]; prompts.len()];
    let mut paths = vec![vec![PathBuf::new(); columns.len()]; prompts.len()];
    let result = (|| -> Result<()> {
        for (c, col) in columns.iter().enumerate() {
            let hashes = attach_all(model, &col.loras)?;
            for (r, prompt) in prompts.iter().enumerate() {
                let p = GenerateParams {
                    prompt: prompt.clone(),
                    batch_size: 1,
                    ..base.clone()
                };
                let img = txt2img(model, tok, &p, &mut |_| {
                    done += 1;
                    progress(done, total);
                })?
                .remove(0);
                let path = out_dir.join(format!("c{c:02}_{}_p{r:02}.png", slug(&col.label)));
                let text = parameters_text(&p, model_name, &col.loras, &hashes);
                save_png(
                    &path,
                    &img,
                    &[("parameters", &text), ("software", &software())],
                )
                .map_err(|e| SdxlError::Param {
                    name: "out",
                    reason: e.to_string(),
                })?;
                cells[r][c] = Some(img);
                paths[r][c] = path;
            }
        }
        Ok(())
    })();
    model.detach_loras();
    result?;
    let (sampler, schedule) = base.sampler.a1111_names();
    let grid = Grid {
        title: format!(
            "{model_name} | seed {} | {} steps | {sampler} {schedule} | CFG {} | {}x{}",
            base.seed,
            base.steps,
            fmt_num(base.cfg),
            base.width,
            base.height
        ),
        col_labels: columns.iter().map(|c| c.label.clone()).collect(),
        row_labels: prompts.to_vec(),
        cells,
    };
    let grid_path = out_dir.join("grid.png");
    write_grid(&grid, &grid_path)?;
    Ok(GridOutput {
        grid: grid_path,
        images: paths,
    })
}

/// File name of in-training sample `row` at `step`.
pub fn training_sample_name(step: u64, row: usize) -> String {
    format!("{step:09}_p{row:02}.png")
}

/// Rebuilds `<dir>/grid.png` from the in-training samples in `dir`
/// (`<step>_p<row>.png`): rows are `prompts`, columns every step found, in
/// order. Returns the grid path, or `None` when there are no samples yet.
pub fn training_samples_grid(
    dir: &Path,
    prompts: &[String],
    title: &str,
) -> Result<Option<PathBuf>> {
    let mut found: std::collections::BTreeMap<u64, Vec<Option<PathBuf>>> = Default::default();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(_) => return Ok(None),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".png") else {
            continue;
        };
        let Some((step, row)) = stem.split_once("_p") else {
            continue;
        };
        let (Ok(step), Ok(row)) = (step.parse::<u64>(), row.parse::<usize>()) else {
            continue;
        };
        if row < prompts.len() {
            found
                .entry(step)
                .or_insert_with(|| vec![None; prompts.len()])[row] = Some(e.path());
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    let mut cells: Vec<Vec<Option<RgbImage>>> = vec![Vec::new(); prompts.len()];
    for files in found.values() {
        for (r, f) in files.iter().enumerate() {
            // An unreadable sample (e.g. removed meanwhile) shows as a grey cell.
            cells[r].push(
                f.as_ref()
                    .and_then(|p| image::open(p).ok())
                    .map(|i| i.to_rgb8()),
            );
        }
    }
    let grid = Grid {
        title: title.to_string(),
        col_labels: found.keys().map(|s| format!("step {s}")).collect(),
        row_labels: prompts.to_vec(),
        cells,
    };
    let path = dir.join("grid.png");
    write_grid(&grid, &path)?;
    Ok(Some(path))
}

/// Renders and writes a grid atomically.
pub fn write_grid(grid: &Grid, path: &Path) -> Result<()> {
    let img = grid.render().map_err(|e| SdxlError::Param {
        name: "grid",
        reason: e.to_string(),
    })?;
    save_png(path, &img, &[("software", &software())]).map_err(|e| SdxlError::Param {
        name: "out",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_parameters_text() {
        let p = GenerateParams {
            prompt: "myakumyaku-san, 1girl".into(),
            negative: "blurry".into(),
            steps: 25,
            cfg: 7.0,
            sampler: "dpmpp_2m_karras".parse().unwrap(),
            seed: 42,
            width: 1024,
            height: 768,
            batch_size: 1,
        };
        let l = LoraUse {
            path: "out/demo/demo_000000100.safetensors".into(),
            strength: 0.8,
        };
        let t = parameters_text(
            &p,
            "sdxl_base",
            &[l],
            &[("demo_000000100".into(), "0123456789abcdef".into())],
        );
        assert_eq!(
            t,
            format!("myakumyaku-san, 1girl <lora:demo_000000100:0.8>\nNegative prompt: blurry\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 1024x768, Model: sdxl_base, Lora hashes: \"demo_000000100: 0123456789ab\", Version: lorakit {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn columns_ordered_by_step() {
        let files: Vec<PathBuf> = [
            "r/x_000000300.safetensors",
            "r/x_000000020.safetensors",
            "r/x_000000100.safetensors",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let cols = checkpoint_columns(&files, &[0.8]);
        let labels: Vec<_> = cols.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["step 20", "step 100", "step 300"]);
        let one = checkpoint_columns(&files[..1], &[0.6, 1.0]);
        let labels: Vec<_> = one.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, ["strength 0.6", "strength 1"]);
        assert_eq!(one[1].loras[0].strength, 1.0);
        let both = checkpoint_columns(&files[1..], &[0.5, 1.0]);
        assert_eq!(both[0].label, "step 20 @ 0.5");
        assert_eq!(slug("step 20 @ 0.5"), "step_20___0.5");
    }
}
