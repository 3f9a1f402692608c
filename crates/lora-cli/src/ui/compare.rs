//! Compare: the walkthrough's last step. A prompts × checkpoints grid at a
//! fixed seed and strength (`lorakit grid` underneath, as a child process),
//! each cell with the parameters its PNG carries; the checkpoint the user
//! marks as "the one" is remembered in the job (`picked.json`) and can be
//! copied out as the final LoRA (`ROOT/loras/<job>.safetensors`).

use super::jobs::existing;
use super::queue::{Kind, State as QueueState};
use super::{blocking, send_file, ApiError, ApiResult, Ui};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
pub struct CompareBody {
    /// Checkpoint files of the run (columns, ordered by step by the grid).
    checkpoints: Vec<String>,
    /// One prompt per row.
    prompts: Vec<String>,
    #[serde(default = "seed")]
    seed: u64,
    #[serde(default = "strength")]
    strength: f64,
    #[serde(default = "steps")]
    steps: u32,
    /// Image side (default: the job's first resolution).
    size: Option<u32>,
}

fn seed() -> u64 {
    42
}
fn strength() -> f64 {
    0.8
}
fn steps() -> u32 {
    25
}

/// `POST /api/jobs/{name}/compare`: renders the grid in the background
/// (a previous grid of the job is replaced).
pub async fn start(
    State(ui): State<Arc<Ui>>,
    Path(name): Path<String>,
    Json(req): Json<CompareBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let dir = existing(&ui, &name)?;
    let run = dir.join("output").join(&name);
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    if req.checkpoints.is_empty() {
        return Err(bad("pick at least one checkpoint".into()));
    }
    let prompts: Vec<String> = req
        .prompts
        .iter()
        .map(|p| p.replace(['\r', '\n'], " ").trim().to_string())
        .filter(|p| !p.is_empty() && !p.starts_with('#'))
        .collect();
    if prompts.is_empty() {
        return Err(bad("give at least one prompt".into()));
    }
    if !(req.strength.is_finite() && (1..=150).contains(&req.steps)) {
        return Err(bad("strength must be a number and steps 1 to 150".into()));
    }
    let mut loras = Vec::new();
    for f in &req.checkpoints {
        let p = ui.root.file_in(&run, f)?;
        if !p.is_file() || !f.ends_with(".safetensors") {
            return Err(bad(format!("{f:?} is not a checkpoint of {name:?}")));
        }
        loras.push(p);
    }
    let cfg = lora_sdxl::JobConfig::load(&dir.join("job.toml")).map_err(ApiError::bad)?;
    let size = req
        .size
        .or(cfg
            .datasets
            .first()
            .and_then(|d| d.resolution.first().copied()))
        .unwrap_or(1024);
    if size == 0 || size % 8 != 0 || size > 2048 {
        return Err(bad(format!("size {size}: a multiple of 8 up to 2048")));
    }
    let out = dir.join("compare");
    let grid = Grid {
        model: cfg.model.name_or_path.clone(),
        device: cfg.job.device.clone(),
        loras,
        size,
    };
    let args = grid_args(&grid, &out, &req)?;
    blocking(move || {
        // queued behind any run; a previous grid of this job is ended first
        let prepare = || prepare_folder(&out, &prompts);
        (ui.queue.enqueue_grid(&name, args, prepare))
            .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))??;
        Ok((StatusCode::ACCEPTED, Json(json!({ "name": name }))))
    })
    .await
}

/// What one grid renders (checked by [`start`]).
struct Grid {
    model: std::path::PathBuf,
    device: Option<String>,
    loras: Vec<std::path::PathBuf>,
    size: u32,
}

/// `lorakit grid`'s arguments for `g`, writing into `out` (prompts in
/// `out/prompts.txt`). Kept as text in the queue file, so a path must be
/// UTF-8.
fn grid_args(g: &Grid, out: &std::path::Path, req: &CompareBody) -> ApiResult<Vec<String>> {
    let text = |p: &std::path::Path| {
        p.to_str().map(str::to_string).ok_or_else(|| {
            let m = format!("{}: the path is not UTF-8; rename it", p.display());
            ApiError::new(StatusCode::BAD_REQUEST, m)
        })
    };
    let mut args = vec!["--model".to_string(), text(&g.model)?, "--loras".into()];
    for l in &g.loras {
        args.push(text(l)?);
    }
    let size = g.size.to_string();
    args.extend([
        "--prompts".into(),
        text(&out.join("prompts.txt"))?,
        "--strength".into(),
        req.strength.to_string(),
        "--seed".into(),
        req.seed.to_string(),
        "--steps".into(),
        req.steps.to_string(),
        "--width".into(),
        size.clone(),
        "--height".into(),
        size,
        "--out".into(),
        text(out)?,
    ]);
    if let Some(d) = &g.device {
        args.extend(["--device".into(), d.clone()]);
    }
    Ok(args)
}

/// A fresh `out` folder holding the grid's `prompts.txt` and an empty
/// `log.txt` (run by the queue once no earlier grid writes there).
fn prepare_folder(out: &std::path::Path, prompts: &[String]) -> ApiResult<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| ApiError::internal(out, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| ApiError::internal(out, e))?;
    lora_core::io::write_atomic(out.join("prompts.txt"), prompts.join("\n").as_bytes())
        .map_err(ApiError::bad)?;
    std::fs::File::create(out.join("log.txt")).map_err(|e| ApiError::internal(out, e))?;
    Ok(())
}

/// `GET /api/jobs/{name}/compare`: the grid's state and, when done, its
/// cells (rows = prompts, columns = checkpoints) with their parameters.
pub async fn status(State(ui): State<Arc<Ui>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let out = dir.join("compare");
    let entry = ui.queue.entry_of(&name, Kind::Grid);
    let picked = std::fs::read(dir.join("picked.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    blocking(move || {
        let state = match (entry.map(|e| e.state), out.join("grid.png").is_file()) {
            (Some(QueueState::Queued), _) => "queued",
            (Some(QueueState::Running), _) => "running",
            (Some(QueueState::Done) | None, true) => "done",
            (_, _) if out.exists() => "failed",
            _ => "none",
        };
        let mut cells: Vec<Value> = Vec::new();
        if state == "done" {
            let mut files: Vec<String> = std::fs::read_dir(&out)
                .map_err(|e| ApiError::internal(&out, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with('c') && f.ends_with(".png"))
                .collect();
            files.sort();
            for f in files {
                // c<col>_<label>_p<row>.png
                let (col, row) = (
                    f.get(1..3).and_then(|c| c.parse::<u32>().ok()),
                    f.rsplit_once("_p")
                        .and_then(|(_, r)| r.trim_end_matches(".png").parse::<u32>().ok()),
                );
                let params = lora_sdxl::render::png_text(out.join(&f))
                    .ok()
                    .and_then(|t| {
                        t.into_iter()
                            .find(|(k, _)| k == "parameters")
                            .map(|(_, v)| v)
                    });
                cells.push(json!({"file": f, "col": col, "row": row, "parameters": params}));
            }
        }
        let prompts: Vec<String> = std::fs::read_to_string(out.join("prompts.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        Ok(Json(json!({
            "state": state, "cells": cells, "picked": picked, "prompts": prompts,
            "log": super::queue::tail(&out.join("log.txt"), 15),
        })))
    })
    .await
}

/// `GET /api/jobs/{name}/compare/{file}`: a grid image.
pub async fn image(
    State(ui): State<Arc<Ui>>,
    Path((name, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let dir = existing(&ui, &name)?;
    let path = ui.root.file_in(&dir.join("compare"), &file)?;
    if !file.ends_with(".png") || !path.is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {file:?}"),
        ));
    }
    send_file(path, false).await
}

#[derive(Deserialize)]
pub struct PickBody {
    file: String,
}

/// `POST /api/jobs/{name}/pick {file}`: remembers "the one" in the job.
pub async fn pick(
    State(ui): State<Arc<Ui>>,
    Path(name): Path<String>,
    Json(req): Json<PickBody>,
) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let path = ui
        .root
        .file_in(&dir.join("output").join(&name), &req.file)?;
    if !path.is_file() || !req.file.ends_with(".safetensors") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not a checkpoint of {name:?}", req.file),
        ));
    }
    let step = lora_sdxl::train::checkpoint::checkpoint_step_of(&req.file, &name);
    let v = json!({ "file": req.file, "step": step });
    lora_core::io::write_atomic(dir.join("picked.json"), v.to_string().as_bytes())
        .map_err(ApiError::bad)?;
    Ok(Json(v))
}

/// `POST /api/jobs/{name}/export`: copies the picked checkpoint to
/// `ROOT/loras/<job>.safetensors` (atomically), the file to use.
pub async fn export(State(ui): State<Arc<Ui>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let picked: Value = std::fs::read(dir.join("picked.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "mark a checkpoint as the one first"))?;
    let file = picked["file"].as_str().unwrap_or_default().to_string();
    let src = ui.root.file_in(&dir.join("output").join(&name), &file)?;
    let loras = ui.root.dir().join("loras");
    std::fs::create_dir_all(&loras).map_err(|e| ApiError::internal(&loras, e))?;
    let dst = ui.root.file_in(&loras, &format!("{name}.safetensors"))?;
    blocking(move || {
        let bytes = std::fs::read(&src).map_err(|e| ApiError::internal(&src, e))?;
        lora_core::io::write_atomic(&dst, &bytes).map_err(ApiError::bad)?;
        Ok(Json(
            json!({ "file": file, "exported": dst.display().to_string() }),
        ))
    })
    .await
}
