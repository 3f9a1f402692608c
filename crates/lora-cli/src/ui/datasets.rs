//! The Datasets API: folders under `--root/datasets`, their images and
//! captions, uploads, the bulk caption tools and `dataset check`.

use super::paths::{check_name, sanitize_upload_name};
use super::{blocking, send_file, ApiError, ApiResult, Ui};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use lora_data::caption::TagStats;
use lora_data::caption_edit::edit_captions;
use lora_data::{check_dataset, CaptionEdit, CheckOptions, ScanOptions, Severity};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// How the UI scans dataset `name`: header reads only, and each image's
/// size and hash kept in `ROOT/.cache/datasets/<name>.facts.json` by (path,
/// size, mtime), so a second view of an unchanged dataset reads no image.
fn scan_opts(ui: &Ui, name: &str) -> ScanOptions {
    let facts = (ui.root.dir().join(".cache/datasets")).join(format!("{name}.facts.json"));
    ScanOptions {
        verify: false,
        facts: Some(facts),
        ..Default::default()
    }
}

/// `GET /api/datasets`: every dataset folder with its image and caption counts.
pub async fn list(State(ui): State<Arc<Ui>>) -> ApiResult<Json<Value>> {
    blocking(move || {
        let dir = ui.root.dir().join("datasets");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| ApiError::internal(&dir, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| check_name("dataset", n).is_ok())
            .collect();
        names.sort();
        for name in names {
            let Ok(path) = ui.root.entry("datasets", "dataset", &name) else {
                continue; // a symlink out of the root is not listed
            };
            let scan = lora_data::scan(&path, &scan_opts(&ui, &name)).map_err(ApiError::bad)?;
            let captioned = scan.images.iter().filter(|i| !i.caption.is_empty()).count();
            out.push(json!({ "name": name, "images": scan.image_files, "captioned": captioned }));
        }
        Ok(Json(json!(out)))
    })
    .await
}

#[derive(Deserialize)]
pub struct NewDataset {
    name: String,
}

/// `POST /api/datasets {name}`: creates an empty dataset folder.
pub async fn create(
    State(ui): State<Arc<Ui>>,
    Json(req): Json<NewDataset>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let path = ui.root.entry("datasets", "dataset", &req.name)?;
    if path.exists() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("a dataset named {:?} exists already", req.name),
        ));
    }
    std::fs::create_dir(&path).map_err(|e| ApiError::internal(&path, e))?;
    Ok((StatusCode::CREATED, Json(json!({ "name": req.name }))))
}

/// `GET /api/datasets/{name}`: its images, captions and the scan's problems.
pub async fn show(State(ui): State<Arc<Ui>>, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    let path = existing(&ui, &name)?;
    blocking(move || {
        let scan = lora_data::scan(&path, &scan_opts(&ui, &name)).map_err(ApiError::bad)?;
        let problems = |file: &str| -> Vec<Value> {
            scan.problems
                .iter()
                .filter(|p| p.file == file)
                .map(|p| json!({"severity": severity(p.severity), "message": p.message}))
                .collect()
        };
        // An image or caption that is a link out of the root is not shown
        // (the scan follows links; the page must not reveal what they reach).
        let images: Vec<Value> = (scan.images.iter())
            .filter(|i| ui.root.contains(&i.path))
            .map(|i| {
                let linked_out = (i.caption_path.as_deref()).is_some_and(|c| !ui.root.contains(c));
                let mut problems = problems(&i.rel);
                if linked_out {
                    problems.push(json!({"severity": "error",
                        "message": "the caption file is a link out of the UI's root: not shown, not trained on from here"}));
                }
                json!({
                    "file": i.rel, "folder": i.group, "repeats": i.repeats,
                    "width": i.width, "height": i.height,
                    "caption": if linked_out { "" } else { i.caption.as_str() },
                    "has_caption_file": i.caption_path.is_some(), "problems": problems,
                })
            })
            .collect();
        let other: Vec<Value> = scan
            .problems
            .iter()
            .filter(|p| !scan.images.iter().any(|i| i.rel == p.file))
            .map(
                |p| json!({"file": p.file, "severity": severity(p.severity), "message": p.message}),
            )
            .collect();
        let folders = folders(&path, &scan);
        Ok(Json(
            json!({ "name": name, "folders": folders, "images": images, "problems": other }),
        ))
    })
    .await
}

/// The dataset's own folder (`.`, each image once per epoch) and its
/// kohya repeat folders (`10_name`: ten times), empty ones included (the
/// page uploads into them), each with its image count.
fn folders(dir: &std::path::Path, scan: &lora_data::Scan) -> Vec<Value> {
    let mut subs: Vec<(String, u32)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            check_name("folder", &name).ok()?;
            Some((name.clone(), lora_data::scan::repeat_prefix(&name)?))
        })
        .collect();
    subs.sort();
    subs.insert(0, (".".into(), 1));
    subs.into_iter()
        .map(|(name, repeats)| {
            let images = scan.images.iter().filter(|i| i.group == name).count();
            json!({ "name": name, "repeats": repeats, "images": images })
        })
        .collect()
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Warning => "warning",
        Severity::Error => "error",
    }
}

/// The dataset's folder; 404 when there is none.
pub(super) fn existing(ui: &Ui, name: &str) -> ApiResult<std::path::PathBuf> {
    let path = ui.root.entry("datasets", "dataset", name)?;
    if !path.is_dir() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no dataset named {name:?}"),
        ));
    }
    Ok(path)
}

/// `GET /api/datasets/{name}/images/{file}`: the image's bytes.
pub async fn image(
    State(ui): State<Arc<Ui>>,
    Path((name, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let dir = existing(&ui, &name)?;
    let path = ui.root.dataset_file(&dir, &file)?;
    if !lora_data::image_io::is_image_path(&path) || !path.is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {file:?} in {name:?}"),
        ));
    }
    send_file(path, false).await
}

/// `PUT /api/datasets/{name}/images/{file}` (raw body): adds an image. The
/// name is sanitised, an existing file is never replaced, and the bytes
/// must be an image lorakit can read within its decoding limits.
pub async fn upload(
    State(ui): State<Arc<Ui>>,
    Path((name, file)): Path<(String, String)>,
    Query(q): Query<UploadQuery>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let dir = existing(&ui, &name)?;
    let base = sanitize_upload_name(&file)?;
    // `clean`: the image's name in the dataset, as the page lists it
    let (dir, clean) = match q.folder.as_deref().filter(|f| !f.is_empty() && *f != ".") {
        None => (dir, base.clone()),
        Some(sub) => (repeat_folder(&ui, &dir, sub)?, format!("{sub}/{base}")),
    };
    let path = ui.root.file_in(&dir, &base)?;
    if path.exists() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{clean:?} exists already in {name:?}"),
        ));
    }
    blocking(move || {
        lora_data::image_io::probe(&path, &body, &Default::default()).map_err(|e| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("{clean}: {e}"))
        })?;
        // never replaces: a second upload of one name at the same moment is a 409
        lora_core::io::create_atomic(&path, |tmp| std::fs::write(tmp, &body)).map_err(
            |e| match e {
                lora_core::LoraError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        format!("{clean:?} exists already in {name:?}"),
                    )
                }
                e => ApiError::internal(&path, e),
            },
        )?;
        Ok((StatusCode::CREATED, Json(json!({ "file": clean }))))
    })
    .await
}

#[derive(Deserialize, Default)]
pub struct UploadQuery {
    /// A kohya repeat folder (`10_name`) to add the image to, created when
    /// missing; absent or `.`: the dataset's own folder.
    folder: Option<String>,
}

/// The repeat folder `sub` of the dataset at `dir`, created when missing:
/// `N_name` with N ≥ 1 (so training reads it, N times per epoch).
fn repeat_folder(ui: &Ui, dir: &std::path::Path, sub: &str) -> ApiResult<std::path::PathBuf> {
    if check_name("folder", sub).is_err() || lora_data::scan::repeat_prefix(sub).is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("folder {sub:?}: a kohya repeat folder is named N_name (say 10_mychar), N ≥ 1, letters, digits, '_', '-', '.'"),
        ));
    }
    let path = ui.root.file_in(dir, sub)?;
    if !path.is_dir() {
        std::fs::create_dir(&path).map_err(|e| ApiError::internal(&path, e))?;
    }
    Ok(path)
}

#[derive(Deserialize)]
pub struct CaptionBody {
    caption: String,
}

/// `PUT /api/datasets/{name}/captions/{image}`: writes the image's
/// same-name caption file atomically (one line).
pub async fn save_caption(
    State(ui): State<Arc<Ui>>,
    Path((name, file)): Path<(String, String)>,
    Json(req): Json<CaptionBody>,
) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let image = ui.root.dataset_file(&dir, &file)?;
    if !lora_data::image_io::is_image_path(&image) || !image.is_file() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {file:?} in {name:?}"),
        ));
    }
    // beside the image, in its (repeat) folder
    let txt = lora_data::caption::caption_path(&image, "txt");
    let folder = image.parent().unwrap_or(&dir);
    let txt = (ui.root).file_in(
        folder,
        &txt.file_name().unwrap_or_default().to_string_lossy(),
    )?;
    let caption = lora_data::caption::join_tags(&lora_data::caption::split_tags(
        &req.caption.replace(['\r', '\n'], " "),
    ));
    lora_core::io::write_atomic(&txt, format!("{caption}\n").as_bytes()).map_err(ApiError::bad)?;
    Ok(Json(json!({ "file": file, "caption": caption })))
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum EditBody {
    AddTrigger { word: String },
    RemoveTags { tags: Vec<String> },
    ReplaceTag { old: String, new: String },
}

/// `POST /api/datasets/{name}/edit?dry_run=true`: a bulk caption edit, as
/// `lorakit caption add-trigger / remove-tags / replace-tag`.
pub async fn edit(
    State(ui): State<Arc<Ui>>,
    Path(name): Path<String>,
    Query(q): Query<DryRun>,
    Json(req): Json<EditBody>,
) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let edit = match req {
        EditBody::AddTrigger { word } if word.trim().is_empty() || word.contains(',') => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "the trigger word must be non-empty and contain no comma",
            ))
        }
        EditBody::AddTrigger { word } => CaptionEdit::AddTrigger(word),
        EditBody::RemoveTags { tags } => CaptionEdit::RemoveTags(tags),
        EditBody::ReplaceTag { old, new } => CaptionEdit::ReplaceTag(old, new),
    };
    blocking(move || {
        let opts = scan_opts(&ui, &name);
        let changes = edit_captions(&dir, &opts, &edit, q.dry_run).map_err(ApiError::bad)?;
        let list: Vec<Value> = changes
            .iter()
            .map(|c| {
                let file = c.path.strip_prefix(&dir).unwrap_or(&c.path);
                json!({"file": file.to_string_lossy(), "before": c.before, "after": c.after, "created": c.created})
            })
            .collect();
        Ok(Json(json!({ "dry_run": q.dry_run, "changes": list })))
    })
    .await
}

#[derive(Deserialize, Default)]
pub struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize, Default)]
pub struct CheckQuery {
    trigger: Option<String>,
    /// Comma-separated resolutions (default 512,768).
    resolution: Option<String>,
}

/// `GET /api/datasets/{name}/check`: `lorakit dataset check`'s report, its
/// problems by file, and the tag statistics with the removal candidates.
pub async fn check(
    State(ui): State<Arc<Ui>>,
    Path(name): Path<String>,
    Query(q): Query<CheckQuery>,
) -> ApiResult<Json<Value>> {
    let dir = existing(&ui, &name)?;
    let resolutions: Vec<u32> = match q.resolution.as_deref() {
        None | Some("") => vec![512, 768],
        Some(s) => s
            .split(',')
            .map(|r| {
                r.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|r| *r > 0 && r % 64 == 0)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("resolution {s:?}: positive multiples of 64, comma-separated"),
                )
            })?,
    };
    blocking(move || {
        let trigger = q.trigger.filter(|t| !t.trim().is_empty());
        let report = check_dataset(
            &dir,
            &CheckOptions {
                // decodes every image once; unchanged verified ones are not decoded again
                scan: ScanOptions {
                    verify: true,
                    ..scan_opts(&ui, &name)
                },
                trigger: trigger.clone(),
                resolutions,
            },
        )
        .map_err(ApiError::bad)?;
        let problems: Vec<Value> = report
            .problems
            .iter()
            .map(
                |p| json!({"file": p.file, "severity": severity(p.severity), "message": p.message}),
            )
            .collect();
        let mut stats = TagStats::default();
        for img in &report.scan.images {
            stats.add(&img.caption);
        }
        let candidates: Vec<String> = stats
            .removal_candidates(0.5, trigger.as_deref())
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        Ok(Json(json!({
            "exit_code": report.exit_code(),
            "report": report.to_string(),
            "problems": problems,
            "tags": stats.sorted().into_iter().take(60).collect::<Vec<_>>(),
            "removal_candidates": candidates,
        })))
    })
    .await
}
