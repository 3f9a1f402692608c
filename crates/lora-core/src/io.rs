//! safetensors reading and atomic writing, plus the kohya/A1111 file hashes.
//!
//! Writes go to a temp file in the destination folder, are fsynced, then
//! renamed over the final name (and the folder fsynced), so a crash or Ctrl-C
//! never leaves a half-written file under the final name.

use crate::error::{LoraError, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Every tensor and the metadata of one safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    /// Path it was read from.
    pub path: PathBuf,
    /// Tensors in file-header order (name, tensor on CPU in the file's dtype).
    pub tensors: Vec<(String, Tensor)>,
    /// `__metadata__` (all strings).
    pub metadata: BTreeMap<String, String>,
    /// Size of the file in bytes.
    pub file_size: u64,
    /// sha256 of the data section (what A1111 calls the addnet hash).
    pub data_sha256: String,
}

/// safetensors dtype ↔ libtorch kind.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// libtorch kind → safetensors dtype.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// Short dtype name as shown to users (`F32`, `F16`, `BF16`…).
pub fn kind_name(kind: Kind) -> String {
    dtype_of(kind)
        .map(|d| format!("{d:?}"))
        .unwrap_or_else(|| format!("{kind:?}"))
}

/// The name a job file or command line gives `kind` (`fp16`, `bf16`,
/// `fp32`; the inverse of [`kind_from_name`]).
pub fn kind_job_name(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Half => Some("fp16"),
        Kind::BFloat16 => Some("bf16"),
        Kind::Float => Some("fp32"),
        _ => None,
    }
}

/// The dtype a job file or command line names: `fp16`, `bf16` or `fp32`.
pub fn kind_from_name(name: &str) -> Option<Kind> {
    match name {
        "fp16" => Some(Kind::Half),
        "bf16" => Some(Kind::BFloat16),
        "fp32" => Some(Kind::Float),
        _ => None,
    }
}

fn st_error(path: &Path, bytes: &[u8], err: &dyn std::fmt::Display) -> LoraError {
    LoraError::Safetensors {
        path: path.to_path_buf(),
        reason: describe_corruption(bytes).unwrap_or_else(|| err.to_string()),
    }
}

/// Explains in words why bytes are not a complete safetensors file, when that
/// can be told from the header alone.
fn describe_corruption(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 8 {
        return Some(format!(
            "the file is only {} bytes long (a safetensors file starts with an 8-byte header length); it is empty or truncated",
            bytes.len()
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    if n > 100_000_000 {
        return Some(format!(
            "the header length field says {n} bytes, which is not plausible: this is not a safetensors file (or it is corrupt)"
        ));
    }
    let end = 8 + n as usize;
    if end > bytes.len() {
        return Some(format!(
            "the file is truncated: its header claims {n} bytes but the file has {} bytes",
            bytes.len()
        ));
    }
    let header: serde_json::Value = match serde_json::from_slice(&bytes[8..end]) {
        Ok(v) => v,
        Err(e) => return Some(format!("the header is not valid JSON ({e})")),
    };
    let max_end = header
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let have = (bytes.len() - end) as u64;
    if max_end > have {
        return Some(format!(
            "the file is truncated: tensor data needs {max_end} bytes after the header but only {have} are present (re-download or re-save it)"
        ));
    }
    None
}

/// Reads a whole safetensors file into CPU tensors (dtypes as stored).
pub fn read_tensors(path: impl AsRef<Path>) -> Result<TensorFile> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| LoraError::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| st_error(path, &bytes, &e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| st_error(path, &bytes, &e))?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    // Header order = order of data offsets.
    let mut names: Vec<(usize, String)> = meta
        .tensors()
        .iter()
        .map(|(name, info)| (info.data_offsets.0, name.clone()))
        .collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for (_, name) in names {
        let view = st.tensor(&name).map_err(|e| st_error(path, &bytes, &e))?;
        let kind = kind_of(view.dtype()).ok_or_else(|| LoraError::UnsupportedDtype {
            path: path.to_path_buf(),
            key: name.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        tensors.push((name, t));
    }
    let header_len =
        8 + u64::from_le_bytes(bytes[..8].try_into().expect("checked by read_metadata")) as usize;
    let data_sha256 = hex(&Sha256::digest(&bytes[header_len..]));
    Ok(TensorFile {
        path: path.to_path_buf(),
        tensors,
        metadata,
        file_size: bytes.len() as u64,
        data_sha256,
    })
}

/// Host bytes of a tensor (contiguous, little-endian, its own dtype).
pub fn tensor_bytes(t: &Tensor) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
    let kind = t.kind();
    let dtype = dtype_of(kind).ok_or_else(|| {
        LoraError::Invalid(format!(
            "cannot store tensors of kind {kind:?} in safetensors"
        ))
    })?;
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut buf, numel)?;
    let shape = t.size().iter().map(|&d| d as usize).collect();
    Ok((dtype, shape, buf))
}

/// Serialises tensors + metadata to safetensors bytes (kohya/safetensors
/// order: dtype descending, then name; header padded to 8 bytes).
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| tensor_bytes(t).map(|(d, s, b)| (n.clone(), d, s, b)))
        .collect::<Result<_>>()?;
    serialize_raw(&raw, metadata)
}

/// [`serialize`] over tensors already on the host as bytes.
pub fn serialize_raw(
    raw: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| LoraError::Invalid(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    safetensors::serialize(views, meta)
        .map_err(|e| LoraError::Invalid(format!("serialising safetensors: {e}")))
}

/// Writes bytes to `path` atomically: temp file in the same folder, fsync,
/// rename, fsync of the folder.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    replace_atomic(path, |tmp| std::fs::File::create(tmp)?.write_all(bytes))
}

/// Creates or replaces `path` atomically with what `write` puts in the
/// temp file it is given (same folder): then fsync, rename, fsync of the
/// folder. On error the temp file is removed and `path` is untouched.
pub fn replace_atomic(
    path: impl AsRef<Path>,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    commit_atomic(path.as_ref(), write, |tmp, path| std::fs::rename(tmp, path))
}

/// Creates `path` atomically with what `write` puts in the temp file it is
/// given, only when nothing has that name: the temp file is hard-linked to
/// the name, which fails when it exists (a [`LoraError::Io`] of kind
/// `AlreadyExists`). Two writers of one name cannot replace each other, and
/// no reader sees half a file.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("a.png");
/// lora_core::io::create_atomic(&p, |tmp| std::fs::write(tmp, b"first")).unwrap();
/// assert!(lora_core::io::create_atomic(&p, |tmp| std::fs::write(tmp, b"second")).is_err());
/// ```
pub fn create_atomic(
    path: impl AsRef<Path>,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    commit_atomic(path.as_ref(), write, |tmp, path| {
        std::fs::hard_link(tmp, path)?;
        std::fs::remove_file(tmp)
    })
}

/// The temp file beside `path` that `write` fills, synced, then put in
/// place by `publish(tmp, path)` and the folder synced; the temp file is
/// removed on any error.
fn commit_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
    publish: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> Result<()> {
    // one temp name per call, also for threads writing at the same instant
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| LoraError::io(&dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| LoraError::Invalid(format!("{}: not a file path", path.display())))?
        .to_string_lossy()
        .into_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{nanos}.{n}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        publish(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(LoraError::io(path, e));
    }
    Ok(())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sshs_model_hash`: sha256 of everything after the header (the tensor data).
pub fn addnet_hash(file_bytes: &[u8]) -> String {
    let n = file_bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .unwrap_or(0);
    let start = (8 + n).min(file_bytes.len());
    hex(&Sha256::digest(&file_bytes[start..]))
}

/// `sshs_legacy_hash`: first 8 hex digits of sha256 over bytes `[0x100000, 0x110000)`.
pub fn legacy_hash(file_bytes: &[u8]) -> String {
    let a = 0x100000.min(file_bytes.len());
    let b = 0x110000.min(file_bytes.len());
    hex(&Sha256::digest(&file_bytes[a..b]))[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names() {
        assert_eq!(kind_from_name("fp16"), Some(Kind::Half));
        assert_eq!(kind_from_name("bf16"), Some(Kind::BFloat16));
        assert_eq!(kind_from_name("fp32"), Some(Kind::Float));
        assert_eq!(kind_from_name("float16"), None);
        for name in ["fp16", "bf16", "fp32"] {
            assert_eq!(kind_from_name(name).and_then(kind_job_name), Some(name));
        }
        assert_eq!(kind_job_name(Kind::Int64), None);
        for k in [Kind::Half, Kind::BFloat16, Kind::Float] {
            assert!(dtype_of(k).is_some());
        }
    }

    #[test]
    fn truncated_and_garbage_files_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::arange(100, (Kind::Float, Device::Cpu));
        let bytes = serialize(&[("x".into(), t)], &BTreeMap::new()).unwrap();
        let p = dir.path().join("cut.safetensors");
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = read_tensors(&p).unwrap_err().to_string();
        assert!(
            e.contains("cut.safetensors") && e.contains("truncated"),
            "{e}"
        );

        std::fs::write(&p, b"abc").unwrap();
        let e = read_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("only 3 bytes"), "{e}");

        let mut bad = 6u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{nope}");
        std::fs::write(&p, &bad).unwrap();
        let e = read_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");

        std::fs::write(&p, b"PK\x03\x04 this is a zip file, not safetensors").unwrap();
        let e = read_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("not plausible"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let n = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_second_creation_of_a_name_never_replaces_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        create_atomic(&path, |tmp| std::fs::write(tmp, b"first")).unwrap();
        let e = create_atomic(&path, |tmp| std::fs::write(tmp, b"second")).unwrap_err();
        assert!(
            matches!(&e, LoraError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        // no temporary file is left behind
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn data_is_sorted_by_name_within_dtype() {
        let a = Tensor::from_slice(&[1f32]);
        let b = Tensor::from_slice(&[2f32]);
        let bytes = serialize(&[("b".into(), b), ("a".into(), a)], &BTreeMap::new()).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(
            &bytes[8 + n..],
            &[1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()
        );
        assert_eq!((8 + n) % 8, 0);
        assert_eq!(&bytes[8..10], b"{\"");
    }
}
