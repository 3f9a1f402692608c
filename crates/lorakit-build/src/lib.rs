//! Build-script helper shared by every lorakit crate that links libtorch.
//!
//! `torch-sys` finds libtorch but its rpath only reaches the C++ compile step,
//! never a downstream binary, and `--as-needed` linkers drop `libtorch_cuda.so`
//! (so CUDA is silently unavailable later). A crate whose build script calls
//! [`link_libtorch`] gets, for its own binaries, tests, examples and benches:
//!
//! * `-Wl,-rpath=<libtorch>/lib` (the canonical path, so `$ORIGIN`-relative
//!   lookups inside pip's torch wheel find the `nvidia/*` libraries),
//! * `-Wl,--no-as-needed -ltorch` so the CUDA part of libtorch stays linked.
//!
//! The crate must depend on `torch-sys` directly: that is what makes cargo
//! hand `DEP_TCH_LIBTORCH_LIB` to its build script.

use std::path::{Path, PathBuf};

/// Emits the link arguments described in the crate docs. Returns the libtorch
/// library directory it used, if torch-sys reported one.
pub fn link_libtorch() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os != "linux" && os != "windows" {
        return None;
    }
    let lib = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from);
    if let Some(lib) = &lib {
        let lib = std::fs::canonicalize(lib).unwrap_or_else(|_| lib.clone());
        println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    lib
}

/// The version string of the libtorch found at `lib_dir` (`<torch>/lib`):
/// read from pip's `torch/version.py` or libtorch's `build-version` file.
pub fn libtorch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest
                    .trim_start_matches([' ', '=', ':', 's', 't', 'r'])
                    .trim();
                let v = v.trim_matches(|c| c == '\'' || c == '"');
                if !v.is_empty() {
                    return Some(v.to_string());
                }
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}
