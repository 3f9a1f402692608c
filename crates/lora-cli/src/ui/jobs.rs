//! The Jobs API: the job form (the template's keys, filled in), jobs saved
//! as `jobs/<name>/job.toml` that `lorakit train` runs unchanged, the queue
//! (start, stop, resume, extend, delete), progress from the run's
//! `events.jsonl`, its checkpoints and log.

use super::paths::check_name;
use super::queue::{tail, State};
use super::{blocking, send_file, ApiError, ApiResult, Ui};
use axum::extract::{Path, Query, State as Axum};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use lora_sdxl::train::Event;
use lora_sdxl::JobConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

fn field_error(field: &str, message: String) -> ApiError {
    ApiError::field(field, message)
}

/// `GET /api/models`: checkpoints under `--root/models`.
pub async fn models(Axum(ui): Axum<Arc<Ui>>) -> ApiResult<Json<Value>> {
    let dir = ui.root.dir().join("models");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors") && !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    Ok(Json(json!(names)))
}

#[derive(Deserialize)]
pub struct NewJob {
    name: String,
    /// The whole job file (the form's advanced view), else the template.
    toml: Option<String>,
    /// `section.key` → value, applied over the text (`datasets.key` is the
    /// first `[[datasets]]` table); `model` and `dataset` name entries of
    /// `models/` and `datasets/`.
    #[serde(default)]
    fields: serde_json::Map<String, Value>,
    model: Option<String>,
    dataset: Option<String>,
}

fn to_toml(field: &str, v: &Value) -> ApiResult<toml_edit::Item> {
    use toml_edit::value;
    Ok(match v {
        Value::Bool(b) => value(*b),
        Value::Number(n) if n.is_i64() => value(n.as_i64().unwrap_or_default()),
        Value::Number(n) => value(n.as_f64().unwrap_or_default()),
        Value::String(s) => value(s.as_str()),
        Value::Array(a) => {
            let mut arr = toml_edit::Array::new();
            for x in a {
                match x {
                    Value::Number(n) if n.is_i64() => arr.push(n.as_i64().unwrap_or_default()),
                    Value::Number(n) => arr.push(n.as_f64().unwrap_or_default()),
                    Value::String(s) => arr.push(s.as_str()),
                    _ => return Err(field_error(field, "a list of numbers or strings".into())),
                }
            }
            value(arr)
        }
        _ => return Err(field_error(field, "not a value a job file can hold".into())),
    })
}

/// The job file text: the given text or the template, the form's fields
/// set in it (comments kept), the name and output folder the UI owns.
fn job_text(req: &NewJob) -> ApiResult<String> {
    let rel = |area: &str, name: &str| format!("../../{area}/{name}");
    let model = req.model.as_deref().map(|m| rel("models", m));
    let dataset = req.dataset.as_deref().map(|d| rel("datasets", d));
    let text = match &req.toml {
        Some(t) => t.clone(),
        None => JobConfig::template(model.as_deref(), dataset.as_deref(), None, None),
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| field_error("syntax", e.to_string()))?;
    let mut set = |path: &str, item: toml_edit::Item| -> ApiResult<()> {
        let (section, key) = path
            .split_once('.')
            .ok_or_else(|| field_error(path, "expected section.key".into()))?;
        let table = if section == "datasets" {
            doc.get_mut("datasets")
                .and_then(|d| d.as_array_of_tables_mut())
                .and_then(|a| a.get_mut(0))
                .ok_or_else(|| field_error(path, "the job has no [[datasets]] table".into()))?
        } else {
            doc.entry(section)
                .or_insert(toml_edit::table())
                .as_table_mut()
                .ok_or_else(|| field_error(path, format!("[{section}] is not a table")))?
        };
        // A value replaced in place keeps its comment (the template's help).
        match (table.get_mut(key).and_then(|i| i.as_value_mut()), item) {
            (Some(old), toml_edit::Item::Value(mut new)) => {
                *new.decor_mut() = old.decor().clone();
                *old = new;
            }
            (_, item) => table[key] = item,
        }
        Ok(())
    };
    if let Some(m) = &model {
        set("model.name_or_path", toml_edit::value(m.as_str()))?;
    }
    if let Some(d) = &dataset {
        set("datasets.folder_path", toml_edit::value(d.as_str()))?;
    }
    for (path, v) in &req.fields {
        set(path, to_toml(path, v)?)?;
    }
    set("job.name", toml_edit::value(req.name.as_str()))?;
    // a new job's identity: it never resumes a state another job wrote
    set("job.id", toml_edit::value(JobConfig::new_id()))?;
    set("job.output_dir", toml_edit::value("output"))?;
    Ok(doc.to_string())
}

/// `POST /api/jobs`: checks the job with the trainer's own validation and
/// that its model and datasets lie under `--root`, then saves it.
pub async fn create(
    Axum(ui): Axum<Arc<Ui>>,
    Json(req): Json<NewJob>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let dir = ui.root.entry("jobs", "job", &req.name)?;
    let file = dir.join("job.toml");
    if file.exists() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("a job named {:?} exists already", req.name),
        ));
    }
    // A deleted job whose checkpoints were kept reserves its name: a new
    // job there would resume the old run's state (its weights and steps).
    if dir.join("output").exists() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the name {:?} is reserved: the checkpoints of a deleted job of that name are kept in {} (a new job would resume that run); choose another name, or delete them (DELETE /api/jobs/{}?confirm=true&with_checkpoints=true)",
                req.name,
                dir.join("output").display(),
                req.name
            ),
        ));
    }
    let text = job_text(&req)?;
    blocking(move || {
        // The folder exists while the job is checked, so its relative paths
        // resolve; it goes again when the job is refused.
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(&dir, e))?;
        let checked = check_job(&ui, &file, &text);
        if checked.is_err() {
            let _ = std::fs::remove_dir(&dir);
        }
        checked?;
        lora_core::io::write_atomic(&file, text.as_bytes()).map_err(ApiError::bad)?;
        Ok((StatusCode::CREATED, Json(json!({ "name": req.name }))))
    })
    .await
}

/// The trainer's validation, plus: the model and datasets lie under `--root`.
fn check_job(ui: &Ui, file: &std::path::Path, text: &str) -> ApiResult<()> {
    let cfg = JobConfig::parse_at(file, text).map_err(|e| field_error(&e.field, e.message))?;
    cfg.validate(file)
        .map_err(|e| field_error(&e.field, e.message))?;
    let under = |p: &std::path::Path, area: &str| {
        p.canonicalize()
            .is_ok_and(|c| c.starts_with(ui.root.dir().join(area)))
    };
    // A checkpoint is an entry of ROOT/models: a file, or a link the user
    // put there to a checkpoint kept elsewhere (the UI never reads or writes
    // it; the training run reads it).
    let models = ui.root.dir().join("models");
    let in_models = cfg
        .model
        .name_or_path
        .parent()
        .is_some_and(|p| p.canonicalize().is_ok_and(|c| c == models))
        && cfg.model.name_or_path.is_file();
    if !in_models {
        return Err(field_error(
            "model.name_or_path",
            format!("must be a checkpoint under {}", models.display()),
        ));
    }
    let datasets = ui.root.dir().join("datasets");
    for (i, d) in cfg.datasets.iter().enumerate() {
        if !under(&d.folder_path, "datasets") {
            return Err(field_error(
                &format!("datasets[{i}].folder_path"),
                format!("must be a dataset under {}", datasets.display()),
            ));
        }
        // the run reads its masks: they stay under the root too
        if d.mask_path.as_ref().is_some_and(|m| !under(m, "datasets")) {
            return Err(field_error(
                &format!("datasets[{i}].mask_path"),
                format!("must be a folder under {}", datasets.display()),
            ));
        }
    }
    Ok(())
}

/// A job's folder, which must hold a job file.
pub(super) fn existing(ui: &Ui, name: &str) -> ApiResult<PathBuf> {
    let dir = ui.root.entry("jobs", "job", name)?;
    if !dir.join("job.toml").is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job named {name:?}"),
        ));
    }
    Ok(dir)
}

/// Progress, losses and checkpoints of a run, from its `events.jsonl`.
fn progress(run_dir: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).unwrap_or_default();
    let (mut step, mut total, mut rate, mut losses, mut vals) =
        (0u64, 0u64, None, Vec::new(), Vec::new());
    let mut checkpoints: Vec<Value> = Vec::new();
    let mut samples: Option<u64> = None;
    let mut seen = std::collections::BTreeSet::new();
    let mut last: Option<String> = None;
    // read through the trainer's own type: a renamed field is a compile
    // error here, not zeros on the page
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Event>(line) else {
            continue;
        };
        last = Some(e.name().to_string());
        match e {
            Event::Started { total_steps, .. } => total = total_steps,
            Event::Step {
                step: s,
                loss,
                train_seconds,
                ..
            } => {
                step = s;
                if let Some(l) = loss {
                    losses.push(json!([s, l]));
                }
                if train_seconds > 0.0 {
                    rate = Some(s as f64 / train_seconds);
                }
            }
            Event::Validation { step: s, loss, .. } => vals.push(json!([s, loss])),
            Event::Samples { step: s, .. } => samples = Some(s),
            Event::Checkpoint { step: s, path, .. } => {
                let file = path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if let Ok(meta) = std::fs::metadata(run_dir.join(&file)) {
                    if seen.insert(file.clone()) {
                        checkpoints.push(json!({"file": file, "step": s, "bytes": meta.len()}));
                    }
                }
            }
            Event::Stopped { .. } | Event::Finished { .. } => {}
        }
    }
    for c in &mut checkpoints {
        let at = c["step"].as_u64();
        c["val_loss"] = vals
            .iter()
            .find(|v| v[0].as_u64() == at)
            .map_or(Value::Null, |v| v[1].clone());
    }
    json!({"step": step, "total_steps": total, "steps_per_second": rate, "loss": losses,
           "validation": vals, "checkpoints": checkpoints, "samples_step": samples, "last_event": last})
}

/// `GET /api/jobs`: every job and its queue state.
pub async fn list(Axum(ui): Axum<Arc<Ui>>) -> ApiResult<Json<Value>> {
    let dir = ui.root.dir().join("jobs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| ApiError::internal(&dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("job.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| check_name("job", n).is_ok())
        .collect();
    names.sort();
    let out: Vec<Value> = names
        .iter()
        .map(|n| {
            let e = ui.queue.entry(n);
            json!({"name": n, "state": e.as_ref().map(|e| e.state), "error": e.and_then(|e| e.error)})
        })
        .collect();
    Ok(Json(json!(out)))
}

/// `GET /api/jobs/{name}`: the job file, its state, progress and log tail.
pub async fn show(Axum(ui): Axum<Arc<Ui>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let toml =
        std::fs::read_to_string(dir.join("job.toml")).map_err(|e| ApiError::internal(&dir, e))?;
    let e = ui.queue.entry(&name);
    Ok(Json(json!({
        "name": name, "toml": toml,
        "state": e.as_ref().map(|e| e.state), "error": e.and_then(|e| e.error),
        "progress": progress(&dir.join("output").join(&name)),
        "log": tail(&dir.join("log.txt"), 40),
    })))
}

#[derive(Deserialize, Default)]
pub struct Action {
    /// `extend`: the new `train.steps`.
    steps: Option<u64>,
}

/// `POST /api/jobs/{name}/{start|stop|resume|extend}`.
pub async fn action(
    Axum(ui): Axum<Arc<Ui>>,
    Path((name, what)): Path<(String, String)>,
    body: Option<Json<Action>>,
) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let conflict = |e: String| ApiError::new(StatusCode::CONFLICT, e);
    let state_file = dir.join("output").join(&name).join("state.safetensors");
    let has_state = state_file.is_file();
    if has_state && what != "stop" {
        own_state(&dir, &state_file)?;
    }
    let mut done = None;
    match what.as_str() {
        "start" => ui.queue.enqueue(&name, has_state).map_err(conflict)?,
        "resume" if !has_state => {
            return Err(conflict(format!(
                "{name:?} has no saved state to resume from"
            )))
        }
        "resume" => ui.queue.enqueue(&name, true).map_err(conflict)?,
        // what a Stop did: it escalates when pressed again
        "stop" => done = Some(ui.queue.stop(&name).map_err(conflict)?),
        "extend" => {
            let steps = body
                .and_then(|b| b.steps)
                .ok_or_else(|| field_error("train.steps", "give the new number of steps".into()))?;
            let file = dir.join("job.toml");
            let text = std::fs::read_to_string(&file).map_err(|e| ApiError::internal(&file, e))?;
            let mut doc: toml_edit::DocumentMut = text
                .parse()
                .map_err(|e: toml_edit::TomlError| field_error("syntax", e.to_string()))?;
            doc["train"]["steps"] = toml_edit::value(steps as i64);
            let new = doc.to_string();
            let cfg =
                JobConfig::parse_at(&file, &new).map_err(|e| field_error(&e.field, e.message))?;
            cfg.validate(&file)
                .map_err(|e| field_error(&e.field, e.message))?;
            // written only once the queue has taken the job (issue 26: a
            // 409 for a running job kept its new step count)
            let write =
                || lora_core::io::write_atomic(&file, new.as_bytes()).map_err(ApiError::bad);
            (ui.queue.enqueue_after(&name, has_state, write)).map_err(conflict)??;
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no action {what:?}"),
            ))
        }
    }
    let state = ui.queue.entry(&name).map(|e| e.state);
    Ok(Json(json!({ "name": name, "state": state, "done": done })))
}

/// Refuses (409, with the reason) a start that would resume a state
/// another job wrote: a job resumes only the state of its own `job.id`.
fn own_state(dir: &std::path::Path, state: &std::path::Path) -> ApiResult<()> {
    let file = dir.join("job.toml");
    let cfg = JobConfig::load(&file).map_err(|e| field_error(&e.field, e.message))?;
    match lora_sdxl::train::foreign_state(state, cfg.job.id.as_deref()) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(ApiError::new(StatusCode::CONFLICT, why)),
        Err(e) => Err(ApiError::bad(e)),
    }
}

#[derive(Deserialize, Default)]
pub struct DeleteQuery {
    #[serde(default)]
    confirm: bool,
    #[serde(default)]
    with_checkpoints: bool,
}

/// `DELETE /api/jobs/{name}?confirm=true[&with_checkpoints=true]`: forgets
/// the job; its run folder (checkpoints) goes only when asked for as well.
pub async fn delete(
    Axum(ui): Axum<Arc<Ui>>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<Json<Value>> {
    // a reserved name (a deleted job's kept checkpoints) can go with them
    let dir = match existing(&ui, &name) {
        Err(_) if q.with_checkpoints => ui.root.entry("jobs", "job", &name)?,
        found => found?,
    };
    if !dir.is_dir() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no job named {name:?}"),
        ));
    }
    if !q.confirm {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "deleting needs confirm=true",
        ));
    }
    if ui
        .queue
        .entry(&name)
        .is_some_and(|e| matches!(e.state, State::Queued | State::Running))
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name:?} is queued or running: stop it first"),
        ));
    }
    ui.queue
        .remove(&name)
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    let target = if q.with_checkpoints {
        dir.clone()
    } else {
        dir.join("job.toml")
    };
    let gone = if q.with_checkpoints {
        std::fs::remove_dir_all(&target)
    } else {
        std::fs::remove_file(&target)
    };
    gone.map_err(|e| ApiError::internal(&target, e))?;
    Ok(Json(
        json!({ "name": name, "checkpoints_kept": !q.with_checkpoints }),
    ))
}

/// `GET /api/jobs/{name}/files/{file}`: a file of the run folder (a
/// checkpoint to download, `loss.png`, a sample).
pub async fn file(
    Axum(ui): Axum<Arc<Ui>>,
    Path((name, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    run_file(&ui, &name, None, &file).await
}

/// `GET /api/jobs/{name}/samples/{file}`: an in-training sample
/// (`grid.png`: prompts × steps).
pub async fn sample(
    Axum(ui): Axum<Arc<Ui>>,
    Path((name, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    run_file(&ui, &name, Some("samples"), &file).await
}

/// A file of the run folder or of one of its sub-folders, as a download.
async fn run_file(ui: &Ui, name: &str, sub: Option<&str>, file: &str) -> ApiResult<Response> {
    let dir = existing(ui, name)?;
    let mut folder = ui.root.file_in(&dir.join("output"), name)?;
    if let Some(sub) = sub {
        folder = ui.root.file_in(&folder, sub)?;
    }
    let path = ui.root.file_in(&folder, file)?;
    if !path.is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no file {file:?} in {name:?}"),
        ));
    }
    send_file(path, true).await
}
