//! `lorakit dataset check`: everything wrong with a dataset, one line per
//! problem naming the file, then a summary.

use crate::buckets::{place, select_bucket, Bucket, BucketSpec};
use crate::caption::{has_tag, split_tags, TagStats};
use crate::error::Result;
use crate::problem::{Problem, Severity};
use crate::scan::{scan, Scan, ScanOptions};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Aspect ratio beyond which an image is flagged.
pub const EXTREME_ASPECT: f64 = 3.0;

/// What to check against.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOptions {
    /// Scan settings.
    pub scan: ScanOptions,
    /// Trigger word every caption should contain.
    pub trigger: Option<String>,
    /// Training resolutions (bucket sets).
    pub resolutions: Vec<u32>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            scan: ScanOptions::default(),
            trigger: None,
            resolutions: vec![512, 768],
        }
    }
}

/// Bucket usage at one resolution.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketUsage {
    /// Bucket → images.
    pub counts: BTreeMap<Bucket, usize>,
    /// Images that would be upscaled.
    pub upscaled: usize,
}

/// The full report.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The scan it is based on.
    pub scan: Scan,
    /// Every problem (scan + check), sorted by file.
    pub problems: Vec<Problem>,
    /// Usage per resolution.
    pub buckets: BTreeMap<u32, BucketUsage>,
    /// Histogram of the shorter side.
    pub short_side: Vec<(String, usize)>,
    /// Tag statistics.
    pub tags: TagStats,
    /// The trigger checked for.
    pub trigger: Option<String>,
}

impl CheckReport {
    /// 0 = usable (warnings allowed), 1 = errors present, 2 = nothing trainable.
    pub fn exit_code(&self) -> i32 {
        if self.scan.images.is_empty() {
            2
        } else if self.errors() > 0 {
            1
        } else {
            0
        }
    }
    /// Number of errors.
    pub fn errors(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }
    /// Number of warnings.
    pub fn warnings(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
            .count()
    }
    /// Samples per epoch: images × repeats × resolutions.
    pub fn samples_per_epoch(&self) -> u64 {
        let per_res: u64 = self.scan.images.iter().map(|i| i.repeats as u64).sum();
        per_res * self.buckets.len() as u64
    }
}

/// Scans and checks a dataset folder.
pub fn check_dataset(root: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let scan = scan(root, &opts.scan)?;
    let mut problems = scan.problems.clone();
    let mut buckets: BTreeMap<u32, BucketUsage> = BTreeMap::new();
    let sets: Vec<(u32, Vec<Bucket>)> = opts
        .resolutions
        .iter()
        .map(|&r| (r, BucketSpec::for_resolution(r).buckets()))
        .collect();
    let mut tags = TagStats::default();
    let edges = [512u32, 768, 1024, 1536, 2048];
    let mut hist = vec![0usize; edges.len() + 1];
    for img in &scan.images {
        tags.add(&img.caption);
        let short = img.width.min(img.height);
        hist[edges.iter().take_while(|&&e| short >= e).count()] += 1;
        let mut upscaled_at = Vec::new();
        for (r, set) in &sets {
            if let Some((b, up)) = select_bucket(set, img.width, img.height) {
                let u = buckets.entry(*r).or_default();
                *u.counts.entry(b).or_default() += 1;
                if up {
                    u.upscaled += 1;
                    upscaled_at.push(format!(
                        "{r} (×{:.2})",
                        place(b, img.width, img.height, 0.5).scale
                    ));
                }
            }
        }
        if !upscaled_at.is_empty() {
            problems.push(Problem {
                severity: Severity::Warning,
                file: img.rel.clone(),
                message: format!(
                    "{}×{} is smaller than every bucket at resolution {}: it will be upscaled (blurry); use a larger image or a lower resolution",
                    img.width,
                    img.height,
                    upscaled_at.join(", ")
                ),
            });
        }
        let ar = img.width.max(img.height) as f64 / img.width.min(img.height).max(1) as f64;
        if ar > EXTREME_ASPECT {
            let kept = sets
                .first()
                .and_then(|(_, set)| select_bucket(set, img.width, img.height))
                .map(|(b, _)| {
                    let p = place(b, img.width, img.height, 0.5);
                    p.crop.width * p.crop.height / (img.width as f64 * img.height as f64)
                })
                .unwrap_or(1.0);
            problems.push(Problem {
                severity: Severity::Warning,
                file: img.rel.clone(),
                message: format!(
                    "extreme aspect ratio {}×{} (1:{ar:.1}): {:.0}% of the image is cropped away",
                    img.width,
                    img.height,
                    (1.0 - kept) * 100.0
                ),
            });
        }
        if let Some(t) = opts.trigger.as_deref().filter(|t| !t.trim().is_empty()) {
            if !has_tag(&split_tags(&img.caption), t) {
                let file = img
                    .caption_path
                    .as_ref()
                    .map(|c| {
                        c.strip_prefix(&scan.root)
                            .unwrap_or(c)
                            .to_string_lossy()
                            .replace('\\', "/")
                    })
                    .unwrap_or_else(|| img.rel.clone());
                problems.push(Problem {
                    severity: Severity::Warning,
                    file,
                    message: format!("trigger word `{t}` missing from the caption (lorakit inserts it at train time; `lorakit caption add-trigger {t}` writes it)"),
                });
            }
        }
    }
    for (r, _) in &sets {
        buckets.entry(*r).or_default();
    }
    problems.sort_by(|a, b| {
        a.file
            .cmp(&b.file)
            .then(b.severity.cmp(&a.severity))
            .then(a.message.cmp(&b.message))
    });
    let labels = [
        "<512",
        "512–767",
        "768–1023",
        "1024–1535",
        "1536–2047",
        "≥2048",
    ];
    let short_side = labels.iter().map(|l| l.to_string()).zip(hist).collect();
    Ok(CheckReport {
        scan,
        problems,
        buckets,
        short_side,
        tags,
        trigger: opts.trigger.clone(),
    })
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            let sev = match p.severity {
                Severity::Error => "error  ",
                Severity::Warning => "warning",
            };
            writeln!(f, "{sev} {}: {}", p.file, p.message)?;
        }
        if !self.problems.is_empty() {
            writeln!(f)?;
        }
        let scan = &self.scan;
        writeln!(f, "dataset:     {}", scan.root.display())?;
        writeln!(
            f,
            "images:      {} usable of {} image files ({} caption files)",
            scan.images.len(),
            scan.image_files,
            scan.caption_files
        )?;
        let repeats: u64 = scan.images.iter().map(|i| i.repeats as u64).sum();
        writeln!(
            f,
            "epoch:       {} samples = {} image repeats × {} resolution(s)",
            self.samples_per_epoch(),
            repeats,
            self.buckets.len()
        )?;
        let hist: Vec<String> = self
            .short_side
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(l, n)| format!("{l}: {n}"))
            .collect();
        writeln!(
            f,
            "short side:  {}",
            if hist.is_empty() {
                "-".into()
            } else {
                hist.join(", ")
            }
        )?;
        for (r, u) in &self.buckets {
            let mut v: Vec<(&Bucket, &usize)> = u.counts.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let list: Vec<String> = v
                .iter()
                .map(|((w, h), n)| format!("{w}x{h} ×{n}"))
                .collect();
            let up = if u.upscaled > 0 {
                format!(" ({} upscaled)", u.upscaled)
            } else {
                String::new()
            };
            writeln!(
                f,
                "buckets@{r}: {}{up}",
                if list.is_empty() {
                    "-".into()
                } else {
                    list.join(", ")
                }
            )?;
        }
        let top: Vec<String> = self
            .tags
            .sorted()
            .into_iter()
            .take(12)
            .map(|(t, n)| format!("{t} ({n})"))
            .collect();
        if !top.is_empty() {
            writeln!(f, "top tags:    {}", top.join(", "))?;
        }
        let cand = self.tags.removal_candidates(0.5, self.trigger.as_deref());
        if !cand.is_empty() && self.tags.captions >= 4 {
            let c: Vec<String> = cand.iter().take(8).map(|(t, _)| t.clone()).collect();
            writeln!(
                f,
                "in most captions (remove them so the trigger learns them?): {}",
                c.join(", ")
            )?;
        }
        let verdict = match self.exit_code() {
            0 => "usable",
            1 => "usable, but some files will be skipped",
            _ => "NOT trainable: no usable image",
        };
        writeln!(
            f,
            "result:      {} error(s), {} warning(s): {verdict}",
            self.errors(),
            self.warnings()
        )
    }
}
