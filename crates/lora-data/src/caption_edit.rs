//! Bulk caption edits (`lorakit caption add-trigger / remove-tags /
//! replace-tag`, the UI's bulk tools): every caption a scan finds, edited
//! as a [`CaptionEdit`] says, written atomically. Its own file: it uses both
//! the scan and the caption rules, which do not use it.

use crate::caption::{caption_path, replace_first_line, CaptionEdit};
use std::path::Path;

/// One caption file changed (or to be changed) by a bulk edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionChange {
    /// The caption file.
    pub path: std::path::PathBuf,
    /// Caption before (empty for a new file).
    pub before: String,
    /// Caption after.
    pub after: String,
    /// The file did not exist and is created.
    pub created: bool,
}

/// Applies `edit` to the caption of every image the scan finds (creating a
/// caption file for an image without one when adding a trigger). With
/// `dry_run` nothing is written. Unchanged files are never touched; changed
/// files are rewritten atomically.
pub fn edit_captions(
    root: &Path,
    opts: &crate::scan::ScanOptions,
    edit: &CaptionEdit,
    dry_run: bool,
) -> crate::error::Result<Vec<CaptionChange>> {
    let scan = crate::scan::scan(
        root,
        &crate::scan::ScanOptions {
            verify: false,
            ..opts.clone()
        },
    )?;
    let mut changes = Vec::new();
    for img in &scan.images {
        let (path, created) = match &img.caption_path {
            Some(p) => (p.clone(), false),
            None if matches!(edit, CaptionEdit::AddTrigger(_)) => {
                (caption_path(&img.path, &opts.caption_ext), true)
            }
            None => continue,
        };
        let after = edit.apply(&img.caption);
        if after == img.caption && !created {
            continue;
        }
        if !dry_run {
            let old = if created {
                Vec::new()
            } else {
                std::fs::read(&path).map_err(|e| crate::error::DataError::io(&path, e))?
            };
            let text = replace_first_line(&old, &after);
            lora_core::io::write_atomic(&path, text.as_bytes())
                .map_err(|e| crate::error::DataError::Invalid(e.to_string()))?;
        }
        changes.push(CaptionChange {
            path,
            before: img.caption.clone(),
            after,
            created,
        });
    }
    Ok(changes)
}
