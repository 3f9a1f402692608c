//! Memory-mapped single-file checkpoints and a path-scoped weight source, so
//! module paths equal checkpoint keys.
//!
//! Each tensor is copied straight from the mapped file to its target dtype and
//! device, one at a time: no second full copy of the checkpoint is ever held.

use crate::error::{Result, SdxlError};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// Where a key lives in the mapped file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Stored dtype.
    pub kind: Kind,
    /// Shape.
    pub shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    infos: BTreeMap<String, TensorInfo>,
    used: RefCell<BTreeSet<String>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl Checkpoint {
    /// Maps a `.safetensors` file and reads its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| SdxlError::io(&path, e))?;
        // SAFETY: the file is opened read-only; lorakit never writes to a
        // checkpoint it has mapped. A concurrent writer would be a user error
        // that at worst yields wrong weights, which the shape checks catch.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| SdxlError::io(&path, e))?;
        let bad = |reason: String| SdxlError::Checkpoint {
            path: path.clone(),
            reason,
        };
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            bad(format!(
                "not a readable safetensors file ({e}); is it truncated or a .ckpt/.bin pickle?"
            ))
        })?;
        let data_start = 8 + header_len;
        let mut infos = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let kind = match info.dtype {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::F16 => Kind::Half,
                safetensors::Dtype::BF16 => Kind::BFloat16,
                safetensors::Dtype::F64 => Kind::Double,
                safetensors::Dtype::I64 => Kind::Int64,
                safetensors::Dtype::I32 => Kind::Int,
                safetensors::Dtype::F8_E4M3 | safetensors::Dtype::F8_E5M2 => {
                    return Err(bad(format!(
                        "tensor `{name}` is stored in {:?} (fp8); lorakit loads fp32/fp16/bf16 checkpoints: convert it to fp16 first",
                        info.dtype
                    )))
                }
                other => return Err(bad(format!("tensor `{name}` has unsupported dtype {other:?}"))),
            };
            let (start, end) = info.data_offsets;
            if data_start + end > mmap.len() {
                return Err(bad(format!(
                    "the file is truncated: tensor `{name}` ends at byte {} but the file has {} bytes",
                    data_start + end,
                    mmap.len()
                )));
            }
            infos.insert(
                name.clone(),
                TensorInfo {
                    kind,
                    shape: info.shape.iter().map(|&d| d as i64).collect(),
                    start,
                    end,
                },
            );
        }
        Ok(Self {
            path,
            mmap,
            data_start,
            infos,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Every key with its dtype and shape.
    pub fn infos(&self) -> &BTreeMap<String, TensorInfo> {
        &self.infos
    }
    /// Shape of a key.
    pub fn shape(&self, key: &str) -> Option<&[i64]> {
        self.infos.get(key).map(|i| i.shape.as_slice())
    }
    /// True when the key exists.
    pub fn contains(&self, key: &str) -> bool {
        self.infos.contains_key(key)
    }
    /// Keys that were never loaded.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.infos
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Loads one tensor, converted to `kind` on `device`.
    pub fn load(&self, key: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let info = self.infos.get(key).ok_or_else(|| SdxlError::MissingKeys {
            path: self.path.clone(),
            count: 1,
            first: vec![key.to_string()],
        })?;
        self.used.borrow_mut().insert(key.to_string());
        let bytes = &self.mmap[self.data_start + info.start..self.data_start + info.end];
        let t = Tensor::f_from_data_size(bytes, &info.shape, info.kind)?;
        // The bytes are copied: let the kernel drop the mapped pages so peak
        // memory stays near one copy of the model, not two.
        // SAFETY: read-only private mapping; DONTNEED only discards pages,
        // which are re-read from the file if touched again.
        let _ = unsafe {
            self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.data_start + info.start,
                info.end - info.start,
            )
        };
        let t = if info.kind == kind {
            t
        } else {
            t.to_kind(kind)
        };
        Ok(if device == Device::Cpu {
            t
        } else {
            t.to_device(device)
        })
    }
}

/// A path-scoped view of a checkpoint: `vb.pp("input_blocks").pp("0")` reads
/// `<prefix>input_blocks.0.<name>`. Shape mismatches and missing keys are
/// collected, so one load reports every problem at once.
#[derive(Clone)]
pub struct VarBuilder {
    ckpt: Rc<Checkpoint>,
    prefix: String,
    /// Length of the prefix at the component root (see [`Self::rooted`]).
    root: usize,
    kind: Kind,
    device: Device,
    problems: Rc<RefCell<Vec<String>>>,
}

impl VarBuilder {
    /// A builder at the checkpoint's root.
    pub fn new(ckpt: Rc<Checkpoint>, kind: Kind, device: Device) -> Self {
        Self {
            ckpt,
            prefix: String::new(),
            root: 0,
            kind,
            device,
            problems: Rc::new(RefCell::new(Vec::new())),
        }
    }
    /// Descends into `name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut v = self.clone();
        v.prefix = format!("{}{name}.", self.prefix);
        v
    }
    /// The full key of `name` here.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    /// Marks this scope as a component's root: [`Self::module_path`] is
    /// relative to it (`model.diffusion_model.` is not part of module paths).
    pub fn rooted(&self) -> Self {
        let mut v = self.clone();
        v.root = v.prefix.len();
        v
    }
    /// The module path of this scope relative to the component root, without
    /// the trailing dot: what LoRA slots are named by.
    pub fn module_path(&self) -> &str {
        let p = &self.prefix[self.root..];
        p.strip_suffix('.').unwrap_or(p)
    }
    /// Dtype weights are loaded in.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Device weights are loaded to.
    pub fn device(&self) -> Device {
        self.device
    }
    /// The checkpoint.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }
    /// True when `name` exists here.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.key(name))
    }
    /// Loads `name`, which must have `shape`. On a problem, records it and
    /// returns zeros of the right shape so construction can continue and report
    /// every problem (see [`Self::finish`]).
    pub fn get(&self, name: &str, shape: &[i64]) -> Tensor {
        self.get_kind(name, shape, self.kind)
    }
    /// Like [`Self::get`] with an explicit dtype (e.g. fp32 for norms).
    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Tensor {
        let key = self.key(name);
        match self.ckpt.shape(&key) {
            None => self.problems.borrow_mut().push(format!("missing `{key}`")),
            Some(s) if s != shape => self
                .problems
                .borrow_mut()
                .push(format!("`{key}` has shape {s:?}, expected {shape:?}")),
            Some(_) => match self.ckpt.load(&key, kind, self.device) {
                Ok(t) => return t,
                Err(e) => self.problems.borrow_mut().push(e.to_string()),
            },
        }
        Tensor::zeros(shape, (kind, self.device))
    }
    /// Errors with every recorded problem (first few by name, and the count).
    pub fn finish(&self, what: &str) -> Result<()> {
        let p = self.problems.borrow();
        if p.is_empty() {
            return Ok(());
        }
        Err(SdxlError::Checkpoint {
            path: self.ckpt.path().to_path_buf(),
            reason: format!(
                "{what}: {} problem(s): {}{}",
                p.len(),
                p.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
                if p.len() > 5 { "; …" } else { "" }
            ),
        })
    }
}
