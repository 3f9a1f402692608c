//! Helpers shared by the example programs (`#[path]`-included).

/// The value after `--name` on the command line, if given.
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}
