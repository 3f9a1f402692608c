//! Every path the UI touches, resolved under `--root`: names are checked
//! before they meet the file system, and the result is canonicalised and
//! must still lie under the root (a symlink pointing out is refused).

use std::path::{Path, PathBuf};

/// Why a name or path was refused (the message is shown to the user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// The UI's root folder, canonical.
#[derive(Debug, Clone)]
pub struct Root {
    dir: PathBuf,
}

/// A dataset or job name: 1–64 of letters, digits, space, `_`, `-`, `.`,
/// starting with a letter or digit (so never `.`, `..` or hidden).
pub fn check_name(kind: &str, name: &str) -> Result<(), Refused> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " _-.".contains(c))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(Refused(format!(
            "{kind} name {name:?}: use 1 to 64 letters, digits, spaces, '_', '-' or '.', starting with a letter or digit"
        )))
    }
}

/// An uploaded file's name made safe: its last path component, characters
/// outside letters, digits, `.`, `_`, `-` replaced by `_`, no leading dot,
/// at most 120 characters; it must end in an image extension lorakit reads.
pub fn sanitize_upload_name(name: &str) -> Result<String, Refused> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    while clean.starts_with('.') {
        clean.remove(0);
    }
    if clean.len() > 120 {
        let ext = clean
            .rsplit_once('.')
            .map(|(_, e)| e.to_string())
            .unwrap_or_default();
        clean = format!("{}.{ext}", &clean[..100]);
    }
    if clean.is_empty() || !lora_data::image_io::is_image_path(Path::new(&clean)) {
        return Err(Refused(format!(
            "{name:?}: not an image file name (png, jpg, jpeg, webp or bmp)"
        )));
    }
    Ok(clean)
}

/// One path component that names nothing but itself: not empty, not
/// hidden (so never `.` or `..`), no separator or NUL.
fn plain(part: &str) -> bool {
    !part.is_empty() && !part.starts_with('.') && !part.contains(['/', '\\', '\0'])
}

impl Root {
    /// Creates `dir` with its `datasets/` and `jobs/` folders when missing.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        for sub in ["datasets", "jobs"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Self {
            dir: dir.canonicalize()?,
        })
    }

    /// The root itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `root/<area>/<name>` for a checked name; when it exists it must
    /// resolve (symlinks followed) to a place under the root.
    pub fn entry(&self, area: &str, kind: &str, name: &str) -> Result<PathBuf, Refused> {
        check_name(kind, name)?;
        self.inside(&self.dir.join(area).join(name))
    }

    /// A file directly in `folder` (already resolved by [`Root::entry`]):
    /// one plain component, and not a symlink out of the root.
    pub fn file_in(&self, folder: &Path, file: &str) -> Result<PathBuf, Refused> {
        if !plain(file) {
            return Err(Refused(format!("{file:?}: not a plain file name")));
        }
        self.inside(&folder.join(file))
    }

    /// A file of a dataset in `folder`: `file`, or `sub/file` in one of
    /// its sub-folders (kohya's `10_name/` repeat folders): each part a
    /// plain name, and not a symlink out of the root.
    pub fn dataset_file(&self, folder: &Path, rel: &str) -> Result<PathBuf, Refused> {
        match rel.split_once('/') {
            None => self.file_in(folder, rel),
            Some((sub, file)) if plain(sub) => self.file_in(&self.inside(&folder.join(sub))?, file),
            Some(_) => Err(Refused(format!("{rel:?}: not a file or folder/file name"))),
        }
    }

    /// Whether `path` (links followed) lies under the root.
    pub fn contains(&self, path: &Path) -> bool {
        self.inside(path).is_ok()
    }

    /// `path` itself when it does not exist yet (its parent must be inside),
    /// else its canonical form, which must be inside.
    fn inside(&self, path: &Path) -> Result<PathBuf, Refused> {
        let outside = || Refused(format!("{}: outside the UI's root", path.display()));
        match path.canonicalize() {
            Ok(real) if real.starts_with(&self.dir) => Ok(real),
            Ok(_) => Err(outside()),
            Err(_) => {
                let parent = path.parent().ok_or_else(outside)?;
                match parent.canonicalize() {
                    Ok(p) if p.starts_with(&self.dir) => {
                        Ok(p.join(path.file_name().ok_or_else(outside)?))
                    }
                    _ => Err(outside()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            "..",
            ".",
            ".hidden",
            "../x",
            "a/b",
            "a\\b",
            "x\0",
            "a..b",
            "-x",
            &"a".repeat(65),
        ] {
            assert!(check_name("dataset", bad).is_err(), "{bad:?}");
        }
        for good in ["my_character", "Myaku 2", "v1.5-set"] {
            check_name("dataset", good).unwrap();
        }
        assert_eq!(sanitize_upload_name("../../etc/x.png").unwrap(), "x.png");
        assert_eq!(
            sanitize_upload_name("C:\\a\\.b c$.JPG").unwrap(),
            "b_c_.JPG"
        );
        assert!(sanitize_upload_name("evil.sh").is_err());
        assert!(sanitize_upload_name("...").is_err());
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret.png"), b"x").unwrap();
        let root = Root::open(&tmp.path().join("root")).unwrap();
        let ds = root.dir().join("datasets");
        std::os::unix::fs::symlink(&outside, ds.join("link")).unwrap();
        std::fs::create_dir(ds.join("real")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.png"), ds.join("real/s.png")).unwrap();
        assert!(root.entry("datasets", "dataset", "link").is_err());
        let real = root.entry("datasets", "dataset", "real").unwrap();
        assert!(root.file_in(&real, "s.png").is_err());
        assert!(root.file_in(&real, "new.png").is_ok());
        assert!(root.file_in(&real, "../x.png").is_err());
        assert!(root.entry("datasets", "dataset", "new one").is_ok());
        // kohya repeat folders: one level of plain names, links still checked
        std::fs::create_dir(real.join("10_char")).unwrap();
        std::os::unix::fs::symlink(&outside, real.join("5_out")).unwrap();
        let inner = root.dataset_file(&real, "10_char/a.png").unwrap();
        assert_eq!(inner, real.join("10_char/a.png"));
        assert_eq!(
            root.dataset_file(&real, "a.png").unwrap(),
            real.join("a.png")
        );
        for bad in [
            "5_out/secret.png",
            "../real/a.png",
            "10_char/../a.png",
            "a/b/c.png",
            ".x/a.png",
            "/a.png",
            "10_char/",
        ] {
            assert!(root.dataset_file(&real, bad).is_err(), "{bad:?}");
        }
    }
}
