//! Auto-captioning a dataset from the UI: `lorakit caption auto` in a
//! background thread, its progress and results polled by the page, a stop
//! that lets the images in flight finish. The endpoint is one of those
//! `lorakit ui` was started with (`endpoints.rs`), named by id: a request
//! names no URL, no variable and no key.

use super::datasets::existing;
use super::{ApiError, ApiResult, Ui};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use lora_data::autocaption::{
    auto_caption, AutoCaptionOptions, CaptionEvent, CaptionStyle, EndpointSettings, Outcome,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One dataset's captioning run.
#[derive(Default)]
pub struct CaptionRun {
    stop: AtomicBool,
    state: Mutex<RunState>,
}

#[derive(Default)]
struct RunState {
    total: usize,
    results: Vec<Value>,
    finished: bool,
    error: Option<String>,
}

/// Unknown fields are refused (an old page's `api_key_env` included).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionBody {
    /// The id of a configured endpoint (`GET /api/caption-endpoints`).
    endpoint: String,
    model: Option<String>,
    trigger: Option<String>,
    #[serde(default)]
    remove: Vec<String>,
    character: Option<String>,
    #[serde(default)]
    natural: bool,
    #[serde(default)]
    overwrite: bool,
    #[serde(default = "concurrency")]
    concurrency: usize,
}

fn concurrency() -> usize {
    1
}

fn outcome_json(rel: &str, o: &Outcome) -> Value {
    match o {
        Outcome::Captioned { caption, .. } => json!({"file": rel, "caption": caption}),
        Outcome::Skipped => json!({"file": rel, "skipped": true}),
        Outcome::Failed(why) => json!({"file": rel, "error": why}),
        Outcome::NotStarted => json!({"file": rel, "not_started": true}),
    }
}

/// `POST /api/datasets/{name}/autocaption`: starts captioning (one run
/// per dataset at a time).
pub async fn start(
    State(ui): State<Arc<Ui>>,
    Path(name): Path<String>,
    Json(req): Json<CaptionBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let dir = existing(&ui, &name)?;
    let settings = EndpointSettings {
        model: req.model.clone().filter(|m| !m.trim().is_empty()),
        ..Default::default()
    };
    let mut endpoint = (ui.endpoints.endpoint(&req.endpoint, settings))
        .map_err(|e| ApiError::field("endpoint", e))?;
    if !(1..=64).contains(&req.concurrency) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "concurrency: 1 to 64",
        ));
    }
    let run = Arc::new(CaptionRun::default());
    {
        let mut runs = ui.captioning.lock().unwrap();
        if runs
            .get(&name)
            .is_some_and(|r| !r.state.lock().unwrap().finished)
        {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{name:?} is being captioned already"),
            ));
        }
        runs.insert(name.clone(), run.clone());
    }
    let opts = AutoCaptionOptions {
        style: if req.natural {
            CaptionStyle::Natural
        } else {
            CaptionStyle::Tags
        },
        trigger: req.trigger.filter(|t| !t.trim().is_empty()),
        remove: req.remove,
        character: req.character.filter(|c| !c.trim().is_empty()),
        concurrency: req.concurrency,
        overwrite: req.overwrite,
        ..Default::default()
    };
    std::thread::spawn(move || {
        let state = || {
            run.state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        // a panic ends this run with its message on the page, not the UI
        let result = super::caught("auto-captioning", || {
            endpoint
                .probe()
                .and_then(|()| endpoint.resolve_model().map(|_| ()))
                .and_then(|()| {
                    auto_caption(&dir, &endpoint, &opts, &run.stop, &|e| {
                        let mut s = state();
                        match e {
                            CaptionEvent::Planned { images, .. } => s.total = images,
                            CaptionEvent::Done(r) => {
                                s.results.push(outcome_json(&r.rel, &r.outcome))
                            }
                        }
                    })
                })
                .map_err(|e| e.to_string())
        });
        let mut s = state();
        match result {
            Ok(Ok(report)) => s.error = report.aborted,
            Ok(Err(e)) => s.error = Some(e),
            Err(panic) => s.error = Some(format!("internal error (a bug in lorakit): {panic}")),
        }
        s.finished = true;
    });
    Ok((StatusCode::ACCEPTED, Json(json!({ "name": name }))))
}

/// `GET /api/caption-endpoints`: the endpoints the form may pick (id, URL,
/// the key's variable name; never a key).
pub async fn endpoints(State(ui): State<Arc<Ui>>) -> Json<Value> {
    Json(ui.endpoints.public())
}

/// `GET /api/datasets/{name}/autocaption`: the run's progress and results.
pub async fn status(State(ui): State<Arc<Ui>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    existing(&ui, &name)?;
    let runs = ui.captioning.lock().unwrap();
    let Some(run) = runs.get(&name) else {
        return Ok(Json(json!({ "state": "none" })));
    };
    let s = run.state.lock().unwrap();
    let state = if s.finished { "finished" } else { "running" };
    Ok(Json(json!({
        "state": state, "total": s.total, "done": s.results.len(),
        "results": s.results, "error": s.error,
    })))
}

/// `POST /api/datasets/{name}/autocaption/stop`.
pub async fn stop(State(ui): State<Arc<Ui>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    existing(&ui, &name)?;
    if let Some(run) = ui.captioning.lock().unwrap().get(&name) {
        run.stop.store(true, Ordering::SeqCst);
    }
    Ok(Json(json!({ "name": name })))
}
