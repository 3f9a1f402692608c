//! What a scan learned about each image file — its size after EXIF
//! orientation and its content hash — kept by (path, byte size, mtime) in
//! a JSON file, so a second scan of an unchanged dataset reads no image
//! ([`crate::ScanOptions::facts`]). A file whose size or mtime changed is
//! read again; a file that failed (a problem) is never cached; an
//! unreadable or stale cache file is only a slower scan.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

/// One image file's facts, with the stamp they are valid for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Facts {
    size: u64,
    mtime_ns: u128,
    /// Width after EXIF orientation.
    pub width: u32,
    /// Height after EXIF orientation.
    pub height: u32,
    /// sha256 of the bytes.
    pub hash: String,
    /// The file was fully decoded once (a `verify` scan).
    pub verified: bool,
}

/// The facts of one dataset's images, by path; saved by [`FactsFile::save`].
pub(crate) struct FactsFile {
    path: PathBuf,
    map: Mutex<HashMap<PathBuf, Facts>>,
    changed: AtomicBool,
}

/// `(size, mtime in ns)` of a file.
fn stamp(meta: &std::fs::Metadata) -> Option<(u64, u128)> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((meta.len(), mtime.as_nanos()))
}

impl FactsFile {
    /// The facts kept in `path` (none when it is missing or unreadable).
    pub fn open(path: &Path) -> Self {
        let map = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self {
            path: path.to_path_buf(),
            map: Mutex::new(map),
            changed: AtomicBool::new(false),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Facts>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The facts of `file` when its size and mtime are those recorded (and,
    /// when `verified` is asked for, it was fully decoded once).
    pub fn get(&self, file: &Path, meta: &std::fs::Metadata, verified: bool) -> Option<Facts> {
        let (size, mtime_ns) = stamp(meta)?;
        let f = self.map().get(file).cloned()?;
        (f.size == size && f.mtime_ns == mtime_ns && (f.verified || !verified)).then_some(f)
    }

    /// Records what a scan found for `file` (as it was when `meta` was taken).
    pub fn put(
        &self,
        file: &Path,
        meta: &std::fs::Metadata,
        (width, height): (u32, u32),
        hash: &str,
        verified: bool,
    ) {
        let Some((size, mtime_ns)) = stamp(meta) else {
            return;
        };
        let facts = Facts {
            size,
            mtime_ns,
            width,
            height,
            hash: hash.to_string(),
            verified,
        };
        if self.map().insert(file.to_path_buf(), facts.clone()) != Some(facts) {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Writes the facts (atomically) when the scan added or changed some,
    /// keeping only the files in `present`.
    pub fn save(&self, present: &[PathBuf]) {
        let mut map = self.map();
        let before = map.len();
        let keep: std::collections::HashSet<&PathBuf> = present.iter().collect();
        map.retain(|p, _| keep.contains(p));
        if !self.changed.load(Ordering::Relaxed) && map.len() == before {
            return;
        }
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let written = serde_json::to_vec(&*map)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                lora_core::io::write_atomic(&self.path, &b).map_err(std::io::Error::other)
            });
        if let Err(e) = written {
            tracing::warn!("{}: cannot save the scan's facts: {e}", self.path.display());
        }
    }
}
