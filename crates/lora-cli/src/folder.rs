//! The dataset folder argument every `dataset` and `caption` command takes
//! (its own file: `data.rs` and `autocaption.rs` both use it, and neither
//! imports the other for it).

use clap::Args;
use lora_data::ScanOptions;
use std::path::PathBuf;

/// Options shared by the dataset commands.
#[derive(Args, Debug, Clone)]
pub struct FolderArgs {
    /// The dataset folder (images with same-name caption files).
    pub dir: PathBuf,
    /// Caption file extension.
    #[arg(long, default_value = "txt")]
    pub caption_ext: String,
    /// Also scan every sub-folder (kohya `N_name` repeat folders are always scanned).
    #[arg(long)]
    pub recursive: bool,
}

impl FolderArgs {
    pub(crate) fn scan_options(&self) -> ScanOptions {
        ScanOptions {
            caption_ext: self.caption_ext.clone(),
            recursive: self.recursive,
            ..Default::default()
        }
    }
}
