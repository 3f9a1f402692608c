//! Typed errors of lora-core. Every variant that concerns a file names it, and
//! every variant that concerns a tensor names its key.

use std::path::PathBuf;

/// Errors returned by lora-core.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Reading or writing a file failed at the OS level.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (truncated, bad header…).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A tensor has a dtype lorakit cannot use.
    #[error("{path}: tensor `{key}` has dtype {dtype}, which lorakit cannot read (supported: F32, F16, BF16, F64, I64, I32)")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The dtype as written in the file.
        dtype: String,
    },
    /// The file holds a full model checkpoint, not a LoRA.
    #[error("{path}: this is not a LoRA file: {what} (key `{key}`). Pass a LoRA .safetensors here; checkpoints go to --model / [model] name_or_path")]
    NotALora {
        /// The file.
        path: PathBuf,
        /// What the file looks like instead.
        what: String,
        /// A key that gave it away.
        key: String,
    },
    /// A LoRA module is incomplete or inconsistent.
    #[error("{path}: LoRA module `{module}`: {reason}")]
    BadModule {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// The module name as written in the file.
        module: String,
        /// What is wrong.
        reason: String,
    },
    /// Keys that no known LoRA format explains.
    #[error("{path}: {count} key(s) are not part of any LoRA format lorakit knows (kohya, AI Toolkit, diffusers/PEFT): {}{}", .first.join(", "), if *.count > .first.len() { ", …" } else { "" })]
    UnknownKeys {
        /// The file.
        path: PathBuf,
        /// How many keys are unknown.
        count: usize,
        /// The first few, by name.
        first: Vec<String>,
    },
    /// Invalid arguments to an adapter or tensor operation.
    #[error("{0}")]
    Invalid(String),
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias for lora-core.
pub type Result<T, E = LoraError> = std::result::Result<T, E>;

impl LoraError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoraError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The message of a caught panic (`std::panic::catch_unwind`'s payload):
/// its `&str` or `String`, or a placeholder.
///
/// ```
/// let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
/// assert_eq!(lora_core::error::panic_message(&*p), "boom 1");
/// ```
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    (payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
