//! Typed errors of lora-sdxl; each names the file and key it is about.

use std::path::PathBuf;

/// Errors returned by lora-sdxl.
#[derive(Debug, thiserror::Error)]
pub enum SdxlError {
    /// OS-level I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The checkpoint cannot be used as it is.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Keys the model needs are absent.
    #[error("{path}: {count} key(s) missing, e.g. {}", .first.join(", "))]
    MissingKeys {
        /// The checkpoint.
        path: PathBuf,
        /// How many.
        count: usize,
        /// The first few.
        first: Vec<String>,
    },
    /// A sampling or job parameter is out of range.
    #[error("{name}: {reason}")]
    Param {
        /// The parameter (`width`, `steps`, …).
        name: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A job file's value is refused (its file and field named).
    #[error(transparent)]
    Job(#[from] crate::train::job::JobError),
    /// Training cannot go on (diverged, a state that does not fit, a
    /// resume past the end, …): what happened and what to do.
    #[error("{reason}")]
    Train {
        /// What is wrong and what to do.
        reason: String,
    },
    /// A LoRA problem.
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
    /// A picture (grid, chart, PNG) that cannot be drawn, written or read.
    #[error("{0}")]
    Picture(String),
    /// libtorch failure.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A data-parallel run failed: its rendezvous, or a collective with the
    /// other ranks.
    #[error("rank {rank} of {world}: {reason}")]
    Dist {
        /// This process's rank.
        rank: usize,
        /// Ranks in the run.
        world: usize,
        /// What failed and what to do.
        reason: String,
    },
}

/// Result alias for lora-sdxl.
pub type Result<T, E = SdxlError> = std::result::Result<T, E>;

impl SdxlError {
    /// A [`SdxlError::Train`] error.
    pub(crate) fn train(reason: impl Into<String>) -> Self {
        SdxlError::Train {
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SdxlError::Io {
            path: path.into(),
            source,
        }
    }
}
