//! Reading a job file: TOML parsing with the unknown-key check, the
//! `train.vram` preset filled in before the sections are read, and paths
//! relative to the file's folder.

use super::{keys, vram, JobConfig, JobError};
use std::path::{Path, PathBuf};

impl JobConfig {
    /// Parses a job file's text (`file` names it in errors): unknown keys and
    /// wrong types are errors naming the field. Values are not validated.
    pub fn parse(file: &Path, text: &str) -> Result<Self, JobError> {
        let err = |field: &str, message: String| JobError {
            file: file.to_path_buf(),
            field: field.into(),
            message,
        };
        let mut value: toml::Value = toml::from_str(text)
            .map_err(|e| err("syntax", e.to_string().trim().replace('\n', " ")))?;
        keys::check_keys(file, &value)?;
        let preset = value.get("train").and_then(|t| t.get("vram"));
        if let Some(name) = preset {
            let found = name.as_str().and_then(vram::find).ok_or_else(|| {
                err(
                    "train.vram",
                    format!(
                        "{name} is not one of {}",
                        vram::NAMES.map(|n| format!("\"{n}\"")).join(", ")
                    ),
                )
            })?;
            found.fill(&mut value);
        }
        value
            .try_into()
            .map_err(|e: toml::de::Error| err("value", e.to_string().trim().replace('\n', " ")))
    }

    /// Reads and parses a job file; relative paths in it are resolved against its folder.
    pub fn load(file: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(file).map_err(|e| JobError {
            file: file.to_path_buf(),
            field: "file".into(),
            message: format!("cannot read the job file: {e}"),
        })?;
        Self::parse_at(file, &text)
    }

    /// Parses `text` as [`JobConfig::load`] would read it from `file`
    /// (relative paths resolved against `file`'s folder), without reading
    /// `file`: for checking a job before it is saved there.
    pub fn parse_at(file: &Path, text: &str) -> Result<Self, JobError> {
        let mut cfg = Self::parse(file, text)?;
        let base = file.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.model.name_or_path);
        fix(&mut cfg.job.output_dir);
        for d in &mut cfg.datasets {
            fix(&mut d.folder_path);
            if let Some(m) = &mut d.mask_path {
                fix(m);
            }
        }
        Ok(cfg)
    }
}
