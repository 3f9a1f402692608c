//! Auto-captioning a dataset folder with a vision model behind any
//! OpenAI-compatible endpoint (`lorakit caption auto`).
//!
//! For each image without a caption: the image goes to
//! `POST {endpoint}/chat/completions` with an instruction ([`prompt`]); the
//! reply is cleaned into tags ([`reply`]); the `remove` tags go, and with a
//! `character` description the model is asked which tags describe the
//! character itself and those go too (the walkthrough's "remove only the
//! words that define the character"); the trigger word goes first; the
//! same-name caption file is written atomically. A failed image is reported
//! by name and the run goes on; a stop request lets the images in flight
//! finish and starts no more.
//!
//! ```no_run
//! use lora_data::autocaption::{auto_caption, AutoCaptionOptions, CaptionEvent, Endpoint, EndpointSettings};
//! use std::sync::atomic::AtomicBool;
//! let mut endpoint = Endpoint::new("http://127.0.0.1:8080/v1", EndpointSettings::default())?;
//! endpoint.resolve_model()?;
//! let opts = AutoCaptionOptions {
//!     trigger: Some("myakumyaku-san".into()),
//!     remove: vec!["blue skin".into(), "red body".into()],
//!     ..Default::default()
//! };
//! let report = auto_caption("dataset/".as_ref(), &endpoint, &opts, &AtomicBool::new(false), &|e| {
//!     if let CaptionEvent::Done(r) = e {
//!         println!("{}: {:?}", r.rel, r.outcome)
//!     }
//! })?;
//! println!("{} captioned, {} failed", report.captioned(), report.failed());
//! # Ok::<(), lora_data::DataError>(())
//! ```

mod endpoint;
#[cfg(any(test, feature = "fake-endpoint"))]
pub mod fake;
pub mod prompt;
pub mod reply;
pub mod request;

pub use endpoint::{check_url, Endpoint, EndpointSettings, RequestError};

use crate::caption::{join_tags, replace_first_line, same_tag, CaptionEdit};
use crate::error::{DataError, Result};
use crate::problem::Severity;
use crate::scan::ScanOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The kind of caption asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptionStyle {
    /// Comma-separated Danbooru-style tags (SDXL / Illustrious / Pony).
    #[default]
    Tags,
    /// One or two sentences.
    Natural,
}

/// Settings of [`auto_caption`].
#[derive(Debug, Clone, PartialEq)]
pub struct AutoCaptionOptions {
    /// Tags or prose.
    pub style: CaptionStyle,
    /// The instruction to send instead of the built-in one.
    pub instruction: Option<String>,
    /// Put first in every caption.
    pub trigger: Option<String>,
    /// Tags to take out of every caption (exact, case-insensitive).
    pub remove: Vec<String>,
    /// A description of the character the LoRA teaches: its own tags are
    /// found by a follow-up question and removed.
    pub character: Option<String>,
    /// Longest image side sent, in pixels.
    pub max_side: u32,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Replace existing non-empty captions (else they are skipped).
    pub overwrite: bool,
    /// Ask the model but write nothing.
    pub dry_run: bool,
    /// How the folder is scanned (caption extension, sub-folders).
    pub scan: ScanOptions,
}

impl Default for AutoCaptionOptions {
    fn default() -> Self {
        Self {
            style: CaptionStyle::Tags,
            instruction: None,
            trigger: None,
            remove: Vec::new(),
            character: None,
            max_side: 1024,
            concurrency: 1,
            overwrite: false,
            dry_run: false,
            scan: ScanOptions {
                verify: false,
                ..Default::default()
            },
        }
    }
}

/// What happened to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Captioned (written, unless a dry run).
    Captioned {
        /// The caption.
        caption: String,
        /// Tags the model named as the character's own, removed.
        character_tags: Vec<String>,
    },
    /// Not sent: it already has a caption.
    Skipped,
    /// Sent and failed, or unreadable; nothing was written.
    Failed(String),
    /// Not started: the run was stopped.
    NotStarted,
}

/// One image's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageResult {
    /// The image, relative to the dataset folder.
    pub rel: String,
    /// Its caption file.
    pub caption_path: PathBuf,
    /// What happened.
    pub outcome: Outcome,
}

/// What [`auto_caption`] reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionEvent<'a> {
    /// The folder is scanned: this many images, this many to send.
    Planned {
        /// Images found (readable or not).
        images: usize,
        /// Images that will be sent (the rest are skipped or unreadable).
        to_send: usize,
    },
    /// One image is done (from a worker thread).
    Done(&'a ImageResult),
}

/// The result of a run, images in folder order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoCaptionReport {
    /// Every image found.
    pub images: Vec<ImageResult>,
    /// The run was stopped before every image was done.
    pub interrupted: bool,
    /// The run ended early because no request could work (the reason).
    pub aborted: Option<String>,
    /// Nothing was written.
    pub dry_run: bool,
}

impl AutoCaptionReport {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.images.iter().filter(|r| f(&r.outcome)).count()
    }
    /// Images captioned.
    pub fn captioned(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Captioned { .. }))
    }
    /// Images skipped (already captioned).
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped))
    }
    /// Images that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }
    /// Images not started (stopped or aborted run).
    pub fn not_started(&self) -> usize {
        self.count(|o| matches!(o, Outcome::NotStarted))
    }
}

/// One image to do: its caption file and whether it is sent at all.
struct Job {
    path: PathBuf,
    rel: String,
    caption_path: PathBuf,
    /// `Some` when it is not sent (skipped or unreadable).
    settled: Option<Outcome>,
}

/// The images of `root` in order, with their caption files; unreadable
/// images come back as failures with the scan's reason.
fn jobs(root: &Path, opts: &AutoCaptionOptions) -> Result<Vec<Job>> {
    let scan = crate::scan::scan(root, &opts.scan)?;
    let caption_for = |p: &Path| crate::caption::caption_path(p, &opts.scan.caption_ext);
    let mut jobs: Vec<Job> = scan
        .images
        .iter()
        .map(|img| Job {
            path: img.path.clone(),
            rel: img.rel.clone(),
            caption_path: img
                .caption_path
                .clone()
                .unwrap_or_else(|| caption_for(&img.path)),
            settled: (!opts.overwrite && !img.caption.trim().is_empty())
                .then_some(Outcome::Skipped),
        })
        .collect();
    for p in &scan.problems {
        let path = root.join(&p.file);
        if p.severity == Severity::Error && crate::image_io::is_image_path(&path) {
            jobs.push(Job {
                caption_path: caption_for(&path),
                path,
                rel: p.file.clone(),
                settled: Some(Outcome::Failed(p.message.clone())),
            });
        }
    }
    jobs.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(jobs)
}

/// Captions every image of `root` as `opts` says. `on_event` hears the
/// plan, then each result as it comes; `stop` lets the images in flight
/// finish and starts no more. Errors only for a folder that cannot
/// be scanned; everything else is in the report.
pub fn auto_caption(
    root: &Path,
    endpoint: &Endpoint,
    opts: &AutoCaptionOptions,
    stop: &AtomicBool,
    on_event: &(dyn Fn(CaptionEvent<'_>) + Sync),
) -> Result<AutoCaptionReport> {
    if let Some(t) = &opts.trigger {
        if t.trim().is_empty() || t.contains(',') {
            return Err(DataError::Invalid(
                "--trigger: the trigger word must be non-empty and contain no comma".into(),
            ));
        }
    }
    let jobs = jobs(root, opts)?;
    on_event(CaptionEvent::Planned {
        images: jobs.len(),
        to_send: jobs.iter().filter(|j| j.settled.is_none()).count(),
    });
    let instruction = prompt::instruction(
        opts.style,
        opts.instruction.as_deref(),
        &opts.remove,
        opts.character.as_deref(),
    );
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    let next = AtomicUsize::new(0);
    let aborted: Mutex<Option<String>> = Mutex::new(None);
    let quit = AtomicBool::new(false);
    let worker = || loop {
        if stop.load(Ordering::SeqCst) || quit.load(Ordering::SeqCst) {
            return;
        }
        let i = next.fetch_add(1, Ordering::SeqCst);
        let Some(job) = jobs.get(i) else { return };
        let outcome = match &job.settled {
            Some(o) => o.clone(),
            None => match caption_one(job, endpoint, opts, &instruction, stop) {
                Ok(o) => o,
                Err(RequestError::Fatal(why)) => {
                    aborted.lock().unwrap().get_or_insert(why.clone());
                    quit.store(true, Ordering::SeqCst);
                    Outcome::Failed(why)
                }
                Err(RequestError::Stopped) => Outcome::NotStarted,
                Err(RequestError::Failed(why)) => Outcome::Failed(why),
            },
        };
        on_event(CaptionEvent::Done(&ImageResult {
            rel: job.rel.clone(),
            caption_path: job.caption_path.clone(),
            outcome: outcome.clone(),
        }));
        results.lock().unwrap()[i] = Some(outcome);
    };
    std::thread::scope(|s| {
        for _ in 0..opts.concurrency.max(1) {
            s.spawn(worker);
        }
    });
    let results = results.into_inner().unwrap();
    let images: Vec<ImageResult> = jobs
        .into_iter()
        .zip(results)
        .map(|(job, o)| ImageResult {
            rel: job.rel,
            caption_path: job.caption_path,
            outcome: o.unwrap_or(Outcome::NotStarted),
        })
        .collect();
    let interrupted = images.iter().any(|r| r.outcome == Outcome::NotStarted);
    Ok(AutoCaptionReport {
        images,
        interrupted,
        aborted: aborted.into_inner().unwrap(),
        dry_run: opts.dry_run,
    })
}

/// Asks for one image's caption, cleans it and (unless a dry run) writes it.
fn caption_one(
    job: &Job,
    endpoint: &Endpoint,
    opts: &AutoCaptionOptions,
    instruction: &str,
    stop: &AtomicBool,
) -> std::result::Result<Outcome, RequestError> {
    let failed = |e: DataError| RequestError::Failed(e.to_string());
    let bytes = std::fs::read(&job.path).map_err(|e| failed(DataError::io(&job.path, e)))?;
    let url = request::image_data_url(&job.path, &bytes, opts.max_side).map_err(failed)?;
    let reply = endpoint.chat(request::image_messages(instruction, &url), 400, stop)?;
    let answer = request::answer(&reply).map_err(RequestError::Failed)?;
    if let Some(first) = reply::refusal(&answer.text) {
        return Err(RequestError::Failed(format!("the model refused: {first}")));
    }
    let (caption, character_tags) = match opts.style {
        CaptionStyle::Natural => (reply::clean_natural(&answer.text), Vec::new()),
        CaptionStyle::Tags => {
            let tags = reply::clean_tags(&answer.text, answer.truncated);
            let tags = CaptionEdit::RemoveTags(opts.remove.clone()).apply(&join_tags(&tags));
            let found = match &opts.character {
                Some(c) => character_tags(endpoint, c, &tags, stop)?,
                None => Vec::new(),
            };
            (CaptionEdit::RemoveTags(found.clone()).apply(&tags), found)
        }
    };
    let caption = match &opts.trigger {
        Some(t) => {
            let rest = CaptionEdit::RemoveTags(vec![t.clone()]).apply(&caption);
            if rest.is_empty() {
                t.trim().to_string()
            } else {
                format!("{}, {rest}", t.trim())
            }
        }
        None => caption,
    };
    if caption.trim().is_empty() {
        return Err(RequestError::Failed(format!(
            "no tags left in the model's reply {:?}",
            answer.text.chars().take(80).collect::<String>()
        )));
    }
    if !opts.dry_run {
        let old = std::fs::read(&job.caption_path).unwrap_or_default();
        let text = replace_first_line(&old, &caption);
        let text = if text.ends_with('\n') {
            text
        } else {
            text + "\n"
        };
        lora_core::io::write_atomic(&job.caption_path, text.as_bytes())
            .map_err(|e| RequestError::Failed(format!("{}: {e}", job.caption_path.display())))?;
    }
    Ok(Outcome::Captioned {
        caption,
        character_tags,
    })
}

/// The follow-up question: which of `caption`'s tags describe the
/// character. Only tags of the caption count (a model cannot add any).
fn character_tags(
    endpoint: &Endpoint,
    character: &str,
    caption: &str,
    stop: &AtomicBool,
) -> std::result::Result<Vec<String>, RequestError> {
    let tags = crate::caption::split_tags(caption);
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let question = prompt::character_question(character, &tags);
    let reply = endpoint.chat(request::text_messages(&question), 200, stop)?;
    let answer = request::answer(&reply)
        .map_err(|e| RequestError::Failed(format!("asking for the character's tags: {e}")))?;
    let named = reply::clean_tags(&answer.text, answer.truncated);
    Ok(tags
        .into_iter()
        .filter(|t| named.iter().any(|n| same_tag(n, t)))
        .collect())
}
