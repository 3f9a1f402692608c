//! # lora-data
//!
//! Datasets for SDXL LoRA training (libtorch is used only by [`cache`], for
//! the cached latents' and embeddings' tensors):
//!
//! * [`scan`](scan::scan): a folder of images with same-name captions (kohya
//!   `N_name` repeat folders, any pixel mode, EXIF orientation, bomb limits);
//! * [`check_dataset`]: every problem by file, plus a summary (`lorakit dataset check`);
//! * [`caption`]: caption files and tag rules, tag statistics, per-step
//!   caption processing (trigger, keep_tokens, shuffle, dropouts);
//!   [`caption_edit`]: the bulk edits of `lorakit caption` over a scanned folder;
//! * [`buckets`]: kohya's aspect buckets, never-upscale assignment and SDXL's
//!   size/crop conditioning from the actual crop;
//! * [`loader`]: seeded epoch plans and a parallel prefetching batch loader;
//! * [`masks`]: loss masks from mask files or alpha channels, aligned with
//!   their images' crops; [`problem`]: what a check reports about a file;
//! * [`cache`]: content-keyed latent / text-embedding caches;
//! * [`autocaption`]: captions from a vision model behind any
//!   OpenAI-compatible endpoint (`lorakit caption auto`);
//! * [`toy_world`]: the procedural picture world of the toy base model, its
//!   demo character and a detector for both.

pub mod autocaption;
pub mod buckets;
pub mod cache;
pub mod caption;
pub mod caption_edit;
pub mod check;
pub mod error;
pub mod image_io;
pub mod loader;
pub mod masks;
pub mod problem;
pub mod scan;
mod scan_facts;
pub mod synthetic;
pub mod toy_world;

pub use buckets::{Bucket, BucketSpec, CropMode, Placement, SizeConditioning};
pub use cache::{LatentKey, TensorCache, TextKey};
pub use caption::{CaptionEdit, CaptionProcessing, TagStats};
pub use check::{check_dataset, CheckOptions, CheckReport};
pub use error::{DataError, Result};
pub use loader::{plan_epoch, LoadedBatch, Loader, PlanConfig, PlannedBatch};
pub use problem::{Problem, Severity};
pub use scan::{scan, ImageEntry, Scan, ScanOptions};
