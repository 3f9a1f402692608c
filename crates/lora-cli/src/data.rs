//! `lorakit dataset …` and `lorakit caption …`.

use crate::folder::FolderArgs;
use crate::AnyResult;
use clap::Subcommand;
use lora_data::caption::TagStats;
use lora_data::caption_edit::edit_captions;
use lora_data::masks::MaskSource;
use lora_data::{check_dataset, CaptionEdit, CheckOptions, ScanOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Report unreadable/corrupt or empty images, missing/orphan/empty captions,
    /// images that would be upscaled, extreme aspect ratios, duplicates and a
    /// missing trigger word; then counts, resolutions, buckets and top tags.
    Check {
        #[command(flatten)]
        folder: FolderArgs,
        /// Trigger word every caption should contain.
        #[arg(long)]
        trigger: Option<String>,
        /// Training resolutions, comma-separated (default: the job's, else 512,768).
        #[arg(long, value_delimiter = ',')]
        resolution: Option<Vec<u32>>,
        /// Check loss masks: a folder of same-name mask images (each must
        /// exist and have its image's size).
        #[arg(long)]
        mask_path: Option<PathBuf>,
        /// Check alpha-channel loss masks (images without alpha are reported).
        #[arg(long, conflicts_with = "mask_path")]
        alpha_mask: bool,
        /// Take the resolutions, the trigger word and the masks from this
        /// job file (its [[datasets]] entry for DIR, else its first one).
        #[arg(long)]
        job: Option<std::path::PathBuf>,
    },
}

/// What `dataset check` takes from a job file.
struct FromJob {
    resolution: Vec<u32>,
    trigger: Option<String>,
    mask: Option<MaskSource>,
}

/// The resolutions, trigger and masks of `dir`'s `[[datasets]]` entry in a
/// job file (the first entry when none names `dir`).
fn from_job(job: &std::path::Path, dir: &std::path::Path) -> AnyResult<FromJob> {
    let cfg = lora_sdxl::JobConfig::load(job)?;
    let same = |p: &std::path::Path| match (p.canonicalize(), dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let ds = cfg
        .datasets
        .iter()
        .find(|d| same(&d.folder_path))
        .or(cfg.datasets.first())
        .ok_or_else(|| format!("{}: the job has no [[datasets]] table", job.display()))?;
    Ok(FromJob {
        resolution: ds.resolution.clone(),
        trigger: cfg.job.trigger_word.clone(),
        mask: mask_source(ds.mask_path.clone(), ds.alpha_mask),
    })
}

fn mask_source(mask_path: Option<PathBuf>, alpha_mask: bool) -> Option<MaskSource> {
    match (mask_path, alpha_mask) {
        (Some(folder), _) => Some(MaskSource::Folder(folder)),
        (None, true) => Some(MaskSource::Alpha),
        (None, false) => None,
    }
}

#[derive(Subcommand, Debug)]
pub enum CaptionCommand {
    /// Prepend WORD to every caption that lacks it (creates missing caption files).
    AddTrigger {
        #[command(flatten)]
        folder: FolderArgs,
        /// The trigger word.
        word: String,
        /// Show the changes without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove tags (exact match after trimming, case-insensitive).
    RemoveTags {
        #[command(flatten)]
        folder: FolderArgs,
        /// Tags to remove.
        #[arg(required = true)]
        tags: Vec<String>,
        /// Show the changes without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace one tag by another.
    ReplaceTag {
        #[command(flatten)]
        folder: FolderArgs,
        /// Tag to replace.
        old: String,
        /// Replacement.
        new: String,
        /// Show the changes without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Caption images with a vision model behind an OpenAI-compatible
    /// endpoint (llama.cpp's llama-server, vLLM, Ollama, LM Studio, OpenAI):
    /// tags cleaned, TAGs removed, the trigger first, written atomically;
    /// existing captions are kept unless --overwrite.
    Auto(crate::autocaption::AutoArgs),
    /// Tag frequencies; tags in most captions are flagged as candidates to
    /// remove for a character LoRA (so the trigger word learns them).
    Stats {
        #[command(flatten)]
        folder: FolderArgs,
        /// The trigger word (never flagged).
        #[arg(long)]
        trigger: Option<String>,
        /// How many tags to list.
        #[arg(long, default_value_t = 40)]
        top: usize,
    },
}

pub fn dataset(cmd: DatasetCommand) -> AnyResult<ExitCode> {
    match cmd {
        DatasetCommand::Check {
            folder,
            trigger,
            resolution,
            mask_path,
            alpha_mask,
            job,
        } => {
            let from = match &job {
                Some(j) => Some(from_job(j, &folder.dir)?),
                None => None,
            };
            let (job_res, job_trigger, job_mask) = match from {
                Some(f) => (Some(f.resolution), f.trigger, f.mask),
                None => (None, None, None),
            };
            let resolution = resolution.or(job_res).unwrap_or_else(|| vec![512, 768]);
            let trigger = trigger.or(job_trigger);
            let mask = mask_source(mask_path, alpha_mask).or(job_mask);
            if let Some(r) = resolution.iter().find(|r| **r == 0 || **r % 64 != 0) {
                return Err(format!("--resolution {r}: resolutions must be positive multiples of 64 (e.g. 512,768,1024)").into());
            }
            if let Some(MaskSource::Folder(m)) = &mask {
                if !m.is_dir() {
                    return Err(format!("--mask-path {}: not a folder", m.display()).into());
                }
            }
            let report = check_dataset(
                &folder.dir,
                &CheckOptions {
                    scan: ScanOptions {
                        mask,
                        ..folder.scan_options()
                    },
                    trigger,
                    resolutions: resolution,
                },
            )?;
            print!("{report}");
            Ok(ExitCode::from(report.exit_code() as u8))
        }
    }
}

pub fn caption(cmd: CaptionCommand, quiet: bool) -> AnyResult<ExitCode> {
    let (folder, edit, dry_run) = match cmd {
        CaptionCommand::Auto(a) => return crate::autocaption::run(a, quiet),
        CaptionCommand::Stats {
            folder,
            trigger,
            top,
        } => {
            let scan = lora_data::scan(
                &folder.dir,
                &ScanOptions {
                    verify: false,
                    ..folder.scan_options()
                },
            )?;
            let mut stats = TagStats::default();
            for img in &scan.images {
                stats.add(&img.caption);
            }
            println!(
                "{} captions, {} distinct tags",
                stats.captions,
                stats.counts.len()
            );
            for (tag, n) in stats.sorted().into_iter().take(top) {
                println!(
                    "{n:>6}  {:>5.1}%  {tag}",
                    100.0 * n as f64 / stats.captions.max(1) as f64
                );
            }
            let cand = stats.removal_candidates(0.5, trigger.as_deref());
            if !cand.is_empty() {
                let names: Vec<String> = cand.iter().map(|(t, _)| t.clone()).collect();
                println!("\nin more than half of the captions: {}", names.join(", "));
                println!(
                    "for a character LoRA, consider: lorakit caption remove-tags {} {}",
                    folder.dir.display(),
                    names
                        .iter()
                        .map(|t| format!("\"{t}\""))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        CaptionCommand::AddTrigger {
            folder,
            word,
            dry_run,
        } => {
            if word.trim().is_empty() || word.contains(',') {
                return Err("the trigger word must be non-empty and contain no comma".into());
            }
            (folder, CaptionEdit::AddTrigger(word), dry_run)
        }
        CaptionCommand::RemoveTags {
            folder,
            tags,
            dry_run,
        } => (folder, CaptionEdit::RemoveTags(tags), dry_run),
        CaptionCommand::ReplaceTag {
            folder,
            old,
            new,
            dry_run,
        } => (folder, CaptionEdit::ReplaceTag(old, new), dry_run),
    };
    let changes = edit_captions(&folder.dir, &folder.scan_options(), &edit, dry_run)?;
    for c in &changes {
        let rel = c
            .path
            .strip_prefix(&folder.dir)
            .unwrap_or(&c.path)
            .display();
        println!("{}{rel}", if c.created { "new " } else { "" });
        if !c.created {
            println!("- {}", c.before);
        }
        println!("+ {}", c.after);
    }
    let verb = if dry_run { "would change" } else { "changed" };
    println!(
        "{verb} {} caption file(s){}",
        changes.len(),
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
