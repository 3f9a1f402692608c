//! What a dataset check reports: one problem about one file, and how bad
//! it is. Shared by the scan, the mask rules, `check` and auto-captioning.

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Training works; the result may be worse.
    Warning,
    /// The file is unusable and will be skipped.
    Error,
}

/// One problem, about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Severity.
    pub severity: Severity,
    /// Path relative to the dataset root.
    pub file: String,
    /// What is wrong and what to do.
    pub message: String,
}
