//! Typed errors of lora-data; each names the file it is about.

use std::path::PathBuf;

/// Errors returned by lora-data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// OS-level I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An image that cannot be used.
    #[error("{path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The dataset as a whole cannot be used.
    #[error("{path}: {reason}")]
    Dataset {
        /// The dataset folder.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// A cache file is unreadable or does not match.
    #[error("{path}: cache entry unusable: {reason}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A captioning endpoint that cannot be used.
    #[error("{url}: {reason}")]
    Endpoint {
        /// The URL asked.
        url: String,
        /// Why, and what to do.
        reason: String,
    },
    /// Invalid settings or arguments.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for lora-data.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
