//! Scanning a dataset folder: images paired with same-name caption files.
//!
//! * Images: png, jpg/jpeg, webp, bmp (case-insensitive). Hidden files and
//!   folders (`.name`) and `_latent_cache`-style folders (leading `_`) are skipped.
//! * Captions: `<stem>.<caption_ext>` beside the image.
//! * kohya repeat folders: a sub-folder named `N_name` (e.g. `10_myaku`) is
//!   always scanned and its images get `N ×` the dataset's `num_repeats`.
//!   Other sub-folders are scanned only with `recursive`.
//! * Every image is probed (header, EXIF orientation, size limits) and, with
//!   `verify`, fully decoded in parallel, so corrupt files are found before
//!   training starts. Problems are collected, never raised, so one bad file
//!   never stops a scan.

use crate::caption::{read_caption, CaptionText};
use crate::error::{DataError, Result};
use crate::image_io::{content_hash, decode_rgb, is_image_path, probe, DecodeLimits, ImageInfo};
pub use crate::problem::{Problem, Severity};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Scan settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanOptions {
    /// Caption extension without the dot (`txt`).
    pub caption_ext: String,
    /// Descend into every sub-folder (repeat folders are always scanned).
    pub recursive: bool,
    /// Repeats per image for this dataset.
    pub num_repeats: u32,
    /// Colour transparent pixels are composited onto.
    pub background: [u8; 3],
    /// Decompression-bomb limits.
    pub limits: DecodeLimits,
    /// Fully decode every image (finds truncated/corrupt files).
    pub verify: bool,
    /// Loss masks (`None`: unmasked).
    pub mask: Option<crate::masks::MaskSource>,
    /// A file keeping each image's size and content hash by (path, byte
    /// size, mtime): a second scan of an unchanged dataset reads no image
    /// (not used while `mask` is set). `None`: every image is read.
    pub facts: Option<PathBuf>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            caption_ext: "txt".into(),
            recursive: false,
            num_repeats: 1,
            background: [255, 255, 255],
            limits: DecodeLimits::default(),
            verify: true,
            mask: None,
            facts: None,
        }
    }
}

/// One usable image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    /// Absolute or as-given path.
    pub path: PathBuf,
    /// Path relative to the dataset root (for messages and metadata).
    pub rel: String,
    /// Width after EXIF orientation.
    pub width: u32,
    /// Height after EXIF orientation.
    pub height: u32,
    /// Times the image is seen per epoch (per resolution).
    pub repeats: u32,
    /// The caption file, when there is one.
    pub caption_path: Option<PathBuf>,
    /// The caption (empty when missing).
    pub caption: String,
    /// sha256 of the file bytes.
    pub content_hash: String,
    /// Size of the image file.
    pub file_size: u64,
    /// Repeat folder name (`10_myaku`) or `.` for the root; used for `ss_tag_frequency`.
    pub group: String,
    /// Its loss mask ([`ScanOptions::mask`]).
    pub mask: Option<crate::masks::Mask>,
}

/// The result of a scan.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// The dataset root.
    pub root: PathBuf,
    /// Usable images, sorted by relative path.
    pub images: Vec<ImageEntry>,
    /// Problems found, sorted by file.
    pub problems: Vec<Problem>,
    /// Image files seen (usable or not).
    pub image_files: usize,
    /// Caption files seen.
    pub caption_files: usize,
}

/// `N_name` → N.
pub fn repeat_prefix(dir_name: &str) -> Option<u32> {
    let (n, rest) = dir_name.split_once('_')?;
    if rest.is_empty() {
        return None;
    }
    n.parse().ok().filter(|&n| n > 0)
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/")
}

struct Found {
    images: Vec<(PathBuf, u32, String)>,
    captions: Vec<PathBuf>,
}

struct Walker<'a> {
    root: &'a Path,
    opts: &'a ScanOptions,
    found: Found,
    problems: Vec<Problem>,
}

impl Walker<'_> {
    fn walk(&mut self, dir: &Path, repeats: u32, group: &str, top: bool) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.problems.push(Problem {
                    severity: Severity::Error,
                    file: rel(self.root, dir),
                    message: format!("cannot read folder: {e}"),
                });
                return;
            }
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let is_dir = std::fs::metadata(&path)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if is_dir {
                if name.starts_with('_') {
                    continue;
                }
                match repeat_prefix(&name) {
                    Some(n) if top => self.walk(&path, repeats * n, &name, false),
                    _ if self.opts.recursive => self.walk(&path, repeats, group, false),
                    _ => {}
                }
            } else if is_image_path(&path) {
                self.found.images.push((path, repeats, group.to_string()));
            } else if path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| x.eq_ignore_ascii_case(&self.opts.caption_ext))
            {
                self.found.captions.push(path);
            }
        }
    }
}

/// Scans `root`. Errors only when the folder itself cannot be read; every
/// per-file problem is reported in [`Scan::problems`].
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<Scan> {
    let meta = std::fs::metadata(root).map_err(|e| DataError::io(root, e))?;
    if !meta.is_dir() {
        return Err(DataError::Dataset {
            path: root.to_path_buf(),
            reason: "not a folder: point folder_path at the folder that holds the images and their .txt captions".into(),
        });
    }
    let ext = opts.caption_ext.trim_start_matches('.').to_string();
    let opts = &ScanOptions {
        caption_ext: ext.clone(),
        ..opts.clone()
    };
    let mut walker = Walker {
        root,
        opts,
        found: Found {
            images: Vec::new(),
            captions: Vec::new(),
        },
        problems: Vec::new(),
    };
    walker.walk(root, opts.num_repeats.max(1), ".", true);
    let Walker {
        found,
        mut problems,
        ..
    } = walker;

    let caption_for = |img: &Path| -> Option<PathBuf> {
        let stem = img.file_stem()?;
        let dir = img.parent()?;
        // exact name first, then a case-insensitive extension match
        let exact = crate::caption::caption_path(img, &ext);
        if exact.is_file() {
            return Some(exact);
        }
        found
            .captions
            .iter()
            .find(|c| c.parent() == Some(dir) && c.file_stem() == Some(stem))
            .cloned()
    };

    struct Probed {
        entry: Option<ImageEntry>,
        problems: Vec<Problem>,
    }
    let facts = opts
        .facts
        .as_deref()
        .map(crate::scan_facts::FactsFile::open);
    let probed: Vec<Probed> = found
        .images
        .par_iter()
        .map(|(path, repeats, group)| {
            let r = rel(root, path);
            let mut problems = Vec::new();
            let err = |msg: String| Problem { severity: Severity::Error, file: r.clone(), message: msg };
            // The facts of an unchanged file come from the facts file, unread.
            let meta = std::fs::metadata(path).ok();
            let known = match (&facts, &meta) {
                (Some(f), Some(m)) if opts.mask.is_none() => f.get(path, m, opts.verify),
                _ => None,
            };
            let (info, hash, file_size, has_alpha) = match known {
                Some(k) => (ImageInfo { width: k.width, height: k.height }, k.hash, meta.as_ref().map_or(0, |m| m.len()), false),
                None => {
                    let bytes = match std::fs::read(path) {
                        Ok(b) => b,
                        Err(e) => {
                            return Probed { entry: None, problems: vec![err(format!("cannot read: {e}"))] };
                        }
                    };
                    let info = match probe(path, &bytes, &opts.limits) {
                        Ok(i) => i,
                        Err(e) => return Probed { entry: None, problems: vec![err(strip_path(&e, path))] },
                    };
                    if opts.verify {
                        if let Err(e) = decode_rgb(path, &bytes, &opts.limits, opts.background) {
                            return Probed { entry: None, problems: vec![err(strip_path(&e, path))] };
                        }
                    }
                    let hash = content_hash(&bytes);
                    if let (Some(f), Some(m)) = (&facts, &meta) {
                        f.put(path, m, (info.width, info.height), &hash, opts.verify);
                    }
                    let alpha = matches!(opts.mask, Some(crate::masks::MaskSource::Alpha)) && crate::image_io::has_alpha(path, &bytes);
                    (info, hash, bytes.len() as u64, alpha)
                }
            };
            let mask = match &opts.mask {
                None => None,
                Some(source) => {
                    let (mask, problem) = crate::masks::resolve_mask(source, &r, (info.width, info.height), has_alpha, &opts.limits);
                    match problem {
                        Some(p) if p.severity == Severity::Error => return Probed { entry: None, problems: vec![p] },
                        p => problems.extend(p),
                    }
                    mask
                }
            };
            let caption_path = caption_for(path);
            let caption = match &caption_path {
                None => {
                    problems.push(Problem {
                        severity: Severity::Warning,
                        file: r.clone(),
                        message: format!("no caption file ({}.{ext}): trains with an empty caption (plus the trigger word)", path.file_stem().unwrap_or_default().to_string_lossy()),
                    });
                    String::new()
                }
                Some(cp) => match read_caption(cp) {
                    Ok(CaptionText { text, lossy, multi_line }) => {
                        let cr = rel(root, cp);
                        if lossy {
                            problems.push(Problem { severity: Severity::Warning, file: cr.clone(), message: "caption is not valid UTF-8; decoded with replacement characters (re-save it as UTF-8)".into() });
                        }
                        if multi_line {
                            problems.push(Problem { severity: Severity::Warning, file: cr.clone(), message: "caption has several lines; only the first is used".into() });
                        }
                        if text.is_empty() {
                            problems.push(Problem { severity: Severity::Warning, file: cr, message: "caption is empty".into() });
                        }
                        text
                    }
                    Err(e) => {
                        problems.push(Problem { severity: Severity::Warning, file: rel(root, cp), message: format!("cannot read caption: {e}") });
                        String::new()
                    }
                },
            };
            Probed {
                entry: Some(ImageEntry {
                    path: path.clone(),
                    rel: r,
                    width: info.width,
                    height: info.height,
                    repeats: *repeats,
                    caption_path,
                    caption,
                    content_hash: hash,
                    file_size,
                    group: group.clone(),
                    mask,
                }),
                problems,
            }
        })
        .collect();

    let mut images = Vec::new();
    for p in probed {
        problems.extend(p.problems);
        images.extend(p.entry);
    }
    if let Some(f) = &facts {
        f.save(&images.iter().map(|i| i.path.clone()).collect::<Vec<_>>());
    }
    // duplicates (same bytes)
    let mut first_of: BTreeMap<&str, &str> = BTreeMap::new();
    for img in &images {
        match first_of.get(img.content_hash.as_str()) {
            Some(first) => problems.push(Problem {
                severity: Severity::Warning,
                file: img.rel.clone(),
                message: format!("duplicate of {first} (same bytes): it counts twice per epoch"),
            }),
            None => {
                first_of.insert(&img.content_hash, &img.rel);
            }
        }
    }
    // orphan captions
    let used: BTreeSet<&PathBuf> = images
        .iter()
        .filter_map(|i| i.caption_path.as_ref())
        .collect();
    let image_stems: BTreeSet<(Option<&Path>, Option<&std::ffi::OsStr>)> = found
        .images
        .iter()
        .map(|(p, _, _)| (p.parent(), p.file_stem()))
        .collect();
    for c in &found.captions {
        if !used.contains(c) && !image_stems.contains(&(c.parent(), c.file_stem())) {
            problems.push(Problem {
                severity: Severity::Warning,
                file: rel(root, c),
                message: "caption without an image (orphan): ignored".into(),
            });
        }
    }
    problems.sort_by(|a, b| {
        a.file
            .cmp(&b.file)
            .then(b.severity.cmp(&a.severity))
            .then(a.message.cmp(&b.message))
    });
    Ok(Scan {
        root: root.to_path_buf(),
        images,
        problems,
        image_files: found.images.len(),
        caption_files: found.captions.len(),
    })
}

/// Error text without the leading `path: ` (the report names the file itself).
fn strip_path(e: &DataError, path: &Path) -> String {
    let s = e.to_string();
    let prefix = format!("{}: ", path.display());
    s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_folder_names() {
        assert_eq!(repeat_prefix("10_myaku"), Some(10));
        assert_eq!(repeat_prefix("3_a_b"), Some(3));
        assert_eq!(repeat_prefix("0_x"), None);
        assert_eq!(repeat_prefix("x_1"), None);
        assert_eq!(repeat_prefix("5_"), None);
        assert_eq!(repeat_prefix("images"), None);
    }
}
