//! `lorakit ui`: a local web UI served from the binary.
//!
//! The server is axum on a tokio runtime: the well-kept standard for HTTP
//! in Rust; the library calls it makes (scans, decoding, caption edits) are
//! blocking and run on tokio's blocking pool. Pages follow a run by polling
//! (every 2 s) what the trainer writes to `events.jsonl`. The page is plain HTML, CSS and JS
//! embedded with `include_str!` — no build step, no Node.
//!
//! | concept | file |
//! |---|---|
//! | who may call (token, cookie, Host, Origin, CSRF, framing) | `security.rs` |
//! | the caption endpoints fixed at start-up (flags, `ui.toml`), their keys | `endpoints.rs` |
//! | names and paths kept under `--root` | `paths.rs` |
//! | the Datasets API | `datasets.rs` |
//! | auto-captioning a dataset (`caption auto` in the background) | `captioning.rs` |
//! | the Jobs API: form, job files, progress, checkpoints | `jobs.rs` |
//! | the New Job form's fields, from the trainer's field table | `job_fields.rs` |
//! | the queue of GPU work: runs and grids, one child process at a time | `queue/` (`liveness.rs`: is a pid still our run) |
//! | Compare: the prompts × steps grid, the picked step, export | `compare.rs` |
//! | the page | `assets/` |

mod captioning;
mod compare;
mod datasets;
mod endpoints;
mod job_fields;
mod jobs;
mod paths;
mod queue;
mod security;

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct UiArgs {
    /// The UI's folder: datasets/ and jobs/ live under it, and nothing
    /// outside it is ever read or written.
    #[arg(long, default_value = "lorakit-ui")]
    root: PathBuf,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port (0: any free port).
    #[arg(long, default_value_t = 8675)]
    port: u16,
    /// Let reads through without the token (changes still need the page's
    /// header): today's single-user behaviour; any local process can then
    /// read datasets and checkpoints. The token itself comes from
    /// LORAKIT_UI_TOKEN, or is new at each start.
    #[arg(long)]
    no_auth: bool,
    /// An OpenAI-compatible endpoint the caption form may use (repeatable);
    /// the page picks one of these and can name no other.
    #[arg(long = "caption-endpoint", value_name = "URL")]
    caption_endpoint: Vec<String>,
    /// The environment variable holding the API key of the
    /// --caption-endpoint given before it (read once at start-up; the key
    /// is sent to that endpoint only).
    #[arg(long = "caption-key-env", value_name = "NAME")]
    caption_key_env: Vec<String>,
    /// Largest upload accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    max_upload_mb: usize,
    /// The caption endpoints as paired on the command line (filled by
    /// [`UiArgs::pair_endpoints`]).
    #[arg(skip)]
    endpoints: Vec<(String, Option<String>)>,
}

impl UiArgs {
    /// Pairs each `--caption-key-env` with the `--caption-endpoint` before
    /// it, from the `ui` subcommand's matches (clap's derive loses the order).
    pub fn pair_endpoints(&mut self, m: &clap::ArgMatches) -> Result<(), String> {
        self.endpoints = endpoints::pairs(m, ("caption_endpoint", "caption_key_env"))?;
        Ok(())
    }
}

/// What every handler shares.
pub struct Ui {
    root: paths::Root,
    token: String,
    queue: queue::Queue,
    /// Auto-captioning runs, per dataset.
    captioning: std::sync::Mutex<std::collections::HashMap<String, Arc<captioning::CaptionRun>>>,
    /// The caption endpoints the page may pick from.
    endpoints: endpoints::CaptionEndpoints,
    /// The last panic of the queue's runner (shown in the page).
    queue_fault: std::sync::Mutex<Option<String>>,
}

impl Ui {
    /// The UI over `root`; runs and grids are started with the `lorakit` binary `exe`.
    fn new(
        root: paths::Root,
        token: String,
        exe: PathBuf,
        endpoints: endpoints::CaptionEndpoints,
    ) -> Arc<Self> {
        let queue = queue::Queue::open(&root.dir().join("jobs"), exe);
        Arc::new(Self {
            root,
            token,
            queue,
            captioning: Default::default(),
            endpoints,
            queue_fault: Default::default(),
        })
    }

    /// Turns the queue every half second, for as long as the process lives
    /// (a panic in one turn is logged and the next turn comes).
    fn start_runner(self: &Arc<Self>) {
        let ui = Arc::downgrade(self);
        std::thread::spawn(move || {
            while let Some(ui) = ui.upgrade() {
                ui.turn(|| ui.queue.tick());
                drop(ui);
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        });
    }
}

impl Ui {
    /// One turn of the queue's runner: a panic in it is logged and kept for
    /// the page (`GET /api/status`), and the next turn comes.
    fn turn(&self, f: impl FnOnce()) {
        if let Err(msg) = caught("the job queue", f) {
            let mut fault = self.queue_fault.lock().unwrap_or_else(|p| p.into_inner());
            *fault = Some(msg);
        }
    }
}

/// `GET /api/status`: what the page shows above every view: the last
/// internal error of the job queue's runner, if there was one.
async fn status(
    axum::extract::State(ui): axum::extract::State<Arc<Ui>>,
) -> axum::Json<serde_json::Value> {
    let fault = ui
        .queue_fault
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    axum::Json(serde_json::json!({ "queue_fault": fault }))
}

/// Runs `f`, turning a panic into its message (logged), so that a bug hit
/// by one turn of a background thread is reported and the thread carries on.
fn caught<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = lora_core::error::panic_message(&*p);
        tracing::error!("{what}: internal error (a bug in lorakit; please report it): {msg}");
        msg
    })
}

/// An API error: a status and one readable sentence, sent as
/// `{"error": …}`, plus `"field"` when it is about one field of a form.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
        }
    }
    /// A form error shown next to `field` (`section.key`).
    fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_string()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
        }
    }
    fn bad(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.to_string())
    }
    fn internal(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}", path.display()),
        )
    }
}

impl From<paths::Refused> for ApiError {
    fn from(r: paths::Refused) -> Self {
        Self::new(StatusCode::BAD_REQUEST, r.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "field": self.field });
        (self.status, axum::Json(body)).into_response()
    }
}

/// Runs blocking library work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )
    })?
}

/// A file's bytes as a response, typed by its extension; a download
/// (`Content-Disposition: attachment`) when `attachment`.
async fn send_file(path: PathBuf, attachment: bool) -> ApiResult<Response> {
    let read = path.clone();
    let bytes =
        blocking(move || std::fs::read(&read).map_err(|e| ApiError::internal(&read, e))).await?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_lowercase();
    let mime = match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "csv" => "text/csv",
        _ => "application/octet-stream",
    };
    let mut resp = ([(header::CONTENT_TYPE, mime)], bytes).into_response();
    if attachment {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().replace('"', ""))
            .unwrap_or_default();
        if let Ok(v) = format!("attachment; filename=\"{name}\"").parse() {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const JOBS_JS: &str = include_str!("assets/jobs.js");
const COMPARE_JS: &str = include_str!("assets/compare.js");
const APP_CSS: &str = include_str!("assets/app.css");

async fn index(axum::extract::State(ui): axum::extract::State<Arc<Ui>>) -> Html<String> {
    Html(INDEX.replace("{{TOKEN}}", &security::html_escape(&ui.token)))
}

/// The largest body of a request other than an image upload (which has
/// `--max-upload-mb`): a job form with many prompts is a few KiB.
const JSON_BODY_LIMIT: usize = 256 << 10;

/// The whole app: pages, API and the access guard around both.
fn router(ui: Arc<Ui>, access: security::Access, max_upload: usize) -> Router {
    let access = Arc::new(access);
    let asset = |mime: &'static str, text: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, mime)], text) })
    };
    Router::new()
        .route("/", get(index))
        .route("/app.js", asset("text/javascript; charset=utf-8", APP_JS))
        .route("/jobs.js", asset("text/javascript; charset=utf-8", JOBS_JS))
        .route(
            "/compare.js",
            asset("text/javascript; charset=utf-8", COMPARE_JS),
        )
        .route("/app.css", asset("text/css; charset=utf-8", APP_CSS))
        .route("/api/datasets", get(datasets::list).post(datasets::create))
        .route("/api/datasets/{name}", get(datasets::show))
        .route("/api/datasets/{name}/check", get(datasets::check))
        .route(
            "/api/datasets/{name}/edit",
            axum::routing::post(datasets::edit),
        )
        .route(
            "/api/datasets/{name}/images/{file}",
            get(datasets::image)
                .put(datasets::upload)
                .layer(axum::extract::DefaultBodyLimit::max(max_upload)),
        )
        .route(
            "/api/datasets/{name}/captions/{file}",
            put(datasets::save_caption),
        )
        .route(
            "/api/datasets/{name}/autocaption",
            get(captioning::status).post(captioning::start),
        )
        .route("/api/caption-endpoints", get(captioning::endpoints))
        .route(
            "/api/datasets/{name}/autocaption/stop",
            axum::routing::post(captioning::stop),
        )
        .route("/api/status", get(status))
        .route("/api/models", get(jobs::models))
        .route("/api/job-fields", get(job_fields::list))
        .route("/api/jobs", get(jobs::list).post(jobs::create))
        .route("/api/jobs/{name}", get(jobs::show).delete(jobs::delete))
        .route("/api/jobs/{name}/files/{file}", get(jobs::file))
        .route("/api/jobs/{name}/samples/{file}", get(jobs::sample))
        .route(
            "/api/jobs/{name}/compare",
            get(compare::status).post(compare::start),
        )
        .route("/api/jobs/{name}/compare/{file}", get(compare::image))
        .route("/api/jobs/{name}/pick", axum::routing::post(compare::pick))
        .route(
            "/api/jobs/{name}/export",
            axum::routing::post(compare::export),
        )
        .route(
            "/api/jobs/{name}/{action}",
            axum::routing::post(jobs::action),
        )
        // every other body is a small JSON document (a form, a caption, prompts)
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            access,
            security::guard,
        ))
        .with_state(ui)
}

/// How many connections the UI serves at once, and how long a client may
/// take to send a request's headers (an idle keep-alive connection counts:
/// it is waiting for the next headers).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub header_timeout: std::time::Duration,
}

impl Default for Limits {
    /// 128 connections (a browser opens 6 per host), 10 s for headers.
    fn default() -> Self {
        Self {
            connections: 128,
            header_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// Serves on `listener` until the process ends. Unlike `axum::serve`, it
/// holds at most `limits.connections` sockets (the rest wait in the
/// kernel's backlog, costing this process no descriptor) and closes a
/// connection whose headers do not arrive within `limits.header_timeout`:
/// a flood of idle sockets can slow the UI down but cannot exhaust the
/// descriptors that runs' logs and the queue need.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // out of descriptors for a moment: wait instead of spinning
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
            drop(permit);
        });
    }
}

/// The token: `LORAKIT_UI_TOKEN` (never argv, which `ps` shows), else new.
fn token() -> Result<String, String> {
    match std::env::var("LORAKIT_UI_TOKEN") {
        Ok(t) if t.trim().len() < 16 => Err("LORAKIT_UI_TOKEN: use at least 16 characters".into()),
        Ok(t) => Ok(t.trim().to_string()),
        Err(_) => Ok(security::new_token()),
    }
}

/// `lorakit ui`.
pub fn run(args: UiArgs) -> crate::AnyResult<std::process::ExitCode> {
    let token = token()?;
    let root = paths::Root::open(&args.root)
        .map_err(|e| format!("--root {}: {e}", args.root.display()))?;
    // the command line's endpoints, then those of ROOT/ui.toml
    let mut pairs = args.endpoints;
    pairs.extend(endpoints::from_file(&root.dir().join("ui.toml"))?);
    let endpoints = endpoints::CaptionEndpoints::new(pairs, |v| std::env::var(v).ok())?;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the lorakit binary: {e}"))?;
    let ui = Ui::new(root, token.clone(), exe, endpoints);
    ui.start_runner();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| format!("--host {} --port {}: {e}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        let access = security::Access {
            token: token.clone(),
            loopback: addr.ip().is_loopback(),
            port: addr.port(),
            auth: !args.no_auth,
        };
        let shown = if addr.ip().is_unspecified() {
            format!("<this machine's address>:{}", addr.port())
        } else {
            addr.to_string()
        };
        println!(
            "lorakit ui: http://{shown}/?token={token}  (root {})",
            ui.root.dir().display()
        );
        if args.no_auth {
            tracing::warn!(
                "--no-auth: any local process can use this UI (reads need no token, and the page that carries it is served to anyone)"
            );
        }
        let app = router(ui, access, args.max_upload_mb << 20);
        serve(listener, app, Limits::default()).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests;
