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

/// Where a key lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Stored dtype.
    pub kind: Kind,
    /// Shape.
    pub shape: Vec<i64>,
    /// The key as written in its file (differs from the map key for diffusers folders).
    pub source_key: String,
    file: usize,
    start: usize,
    end: usize,
}

struct Mapped {
    mmap: Mmap,
    data_start: usize,
}

/// A memory-mapped checkpoint: one single-file `.safetensors`, or a diffusers
/// folder (`unet/`, `text_encoder/`, `text_encoder_2/`, `vae/`, sharded or
/// not) whose keys are presented under their single-file names.
pub struct Checkpoint {
    path: PathBuf,
    files: Vec<Mapped>,
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

type RawInfo = (String, Kind, Vec<i64>, usize, usize);

fn map_file(path: &Path) -> Result<(Mapped, Vec<RawInfo>)> {
    let file = std::fs::File::open(path).map_err(|e| SdxlError::io(path, e))?;
    // SAFETY: the file is opened read-only; lorakit never writes to a
    // checkpoint it has mapped. A concurrent writer would be a user error
    // that at worst yields wrong weights, which the shape checks catch.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| SdxlError::io(path, e))?;
    let bad = |reason: String| SdxlError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        bad(format!(
            "not a readable safetensors file ({e}); is it truncated or a .ckpt/.bin pickle?"
        ))
    })?;
    let data_start = 8 + header_len;
    let mut raw = Vec::new();
    for (name, info) in meta.tensors() {
        let kind = match info.dtype {
            safetensors::Dtype::F8_E4M3 | safetensors::Dtype::F8_E5M2 => {
                return Err(bad(format!(
                    "tensor `{name}` is stored in {:?} (fp8); lorakit loads fp32/fp16/bf16 checkpoints: convert it to fp16 first",
                    info.dtype
                )))
            }
            other => lora_core::io::kind_of(other)
                .ok_or_else(|| bad(format!("tensor `{name}` has unsupported dtype {other:?}")))?,
        };
        let (start, end) = info.data_offsets;
        if data_start + end > mmap.len() {
            return Err(bad(format!(
                "the file is truncated: tensor `{name}` ends at byte {} but the file has {} bytes",
                data_start + end,
                mmap.len()
            )));
        }
        raw.push((
            name.clone(),
            kind,
            info.shape.iter().map(|&d| d as i64).collect(),
            start,
            end,
        ));
    }
    Ok((Mapped { mmap, data_start }, raw))
}

/// The weight files of one diffusers component: an index json's shards, or
/// `<base>.safetensors`, or the `fp16` variant.
fn diffusers_weight_files(cdir: &Path, base: &str) -> Result<Vec<PathBuf>> {
    for index in [
        format!("{base}.safetensors.index.json"),
        format!("{base}.safetensors.index.fp16.json"),
    ] {
        let p = cdir.join(&index);
        if p.is_file() {
            let text = std::fs::read_to_string(&p).map_err(|e| SdxlError::io(&p, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| SdxlError::Checkpoint {
                    path: p.clone(),
                    reason: format!("bad index json: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| SdxlError::Checkpoint {
                    path: p.clone(),
                    reason: "index json has no weight_map".into(),
                })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            return Ok(shards.into_iter().map(|f| cdir.join(f)).collect());
        }
    }
    for name in [
        format!("{base}.safetensors"),
        format!("{base}.fp16.safetensors"),
    ] {
        let p = cdir.join(name);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    Ok(Vec::new())
}

impl Checkpoint {
    /// Maps a single-file `.safetensors` checkpoint, or a diffusers folder.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            return Self::open_diffusers(&path);
        }
        let (mapped, raw) = map_file(&path)?;
        let mut infos = BTreeMap::new();
        for (name, kind, shape, start, end) in raw {
            infos.insert(
                name.clone(),
                TensorInfo {
                    kind,
                    shape,
                    source_key: name,
                    file: 0,
                    start,
                    end,
                },
            );
        }
        Ok(Self {
            path,
            files: vec![mapped],
            infos,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// Maps a diffusers folder; keys are renamed to the single-file layout
    /// (see [`crate::model::keys::diffusers_to_single_file`]).
    pub fn open_diffusers(dir: &Path) -> Result<Self> {
        let bad = |reason: String| SdxlError::Checkpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let mut files = Vec::new();
        let mut infos = BTreeMap::new();
        let mut missing = Vec::new();
        for (component, base) in crate::model::keys::DIFFUSERS_COMPONENTS {
            let cdir = dir.join(component);
            let weight_files = diffusers_weight_files(&cdir, base)?;
            if weight_files.is_empty() {
                missing.push(format!("{component}/{base}.safetensors"));
                continue;
            }
            let mut raw_all = Vec::new();
            for wf in weight_files {
                let (mapped, raw) = map_file(&wf)?;
                let idx = files.len();
                files.push(mapped);
                raw_all.extend(raw.into_iter().map(|r| (idx, r)));
            }
            let vae_levels = raw_all
                .iter()
                .filter_map(|(_, (k, ..))| {
                    k.strip_prefix("encoder.down_blocks.")?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .map(|m| m + 1)
                .unwrap_or(0);
            for (idx, (name, kind, shape, start, end)) in raw_all {
                let Some(key) =
                    crate::model::keys::diffusers_to_single_file(component, &name, vae_levels)
                else {
                    return Err(bad(format!("{component}: key `{name}` has no single-file equivalent (not an SDXL {component}?)")));
                };
                infos.insert(
                    key,
                    TensorInfo {
                        kind,
                        shape,
                        source_key: format!("{component}/{name}"),
                        file: idx,
                        start,
                        end,
                    },
                );
            }
        }
        if files.is_empty() {
            return Err(bad("not a diffusers model folder (no unet/, text_encoder/, text_encoder_2/ or vae/ weights in .safetensors)".into()));
        }
        if !missing.is_empty() {
            return Err(bad(format!(
                "diffusers folder is missing: {} (.bin weights are not read; convert them to .safetensors)",
                missing.join(", ")
            )));
        }
        Ok(Self {
            path: dir.to_path_buf(),
            files,
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
    /// The stored bytes of `key` (little-endian, its stored dtype), borrowed
    /// from the mapping: for copying tensors unchanged.
    pub fn raw(&self, key: &str) -> Option<&[u8]> {
        let info = self.infos.get(key)?;
        let f = &self.files[info.file];
        Some(&f.mmap[f.data_start + info.start..f.data_start + info.end])
    }

    /// Whether this is a diffusers folder (several files) rather than one file.
    pub fn is_folder(&self) -> bool {
        self.path.is_dir()
    }

    pub fn load(&self, key: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let info = self.infos.get(key).ok_or_else(|| SdxlError::MissingKeys {
            path: self.path.clone(),
            count: 1,
            first: vec![key.to_string()],
        })?;
        self.used.borrow_mut().insert(key.to_string());
        let f = &self.files[info.file];
        let bytes = &f.mmap[f.data_start + info.start..f.data_start + info.end];
        let t = Tensor::f_from_data_size(bytes, &info.shape, info.kind)?;
        // The bytes are copied: let the kernel drop the mapped pages so peak
        // memory stays near one copy of the model, not two.
        // SAFETY: read-only private mapping; DONTNEED only discards pages,
        // which are re-read from the file if touched again.
        let _ = unsafe {
            f.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                f.data_start + info.start,
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

/// (key, shape) pairs recorded by a [`VarBuilder`].
pub type KeyShapes = Vec<(String, Vec<i64>)>;

/// A path-scoped view of a checkpoint: `vb.pp("input_blocks").pp("0")` reads
/// `<prefix>input_blocks.0.<name>`. Shape mismatches and missing keys are
/// collected, so one load reports every problem at once.
#[derive(Clone)]
pub struct VarBuilder {
    /// `None` in dry-run mode ([`Self::dry`]).
    ckpt: Option<Rc<Checkpoint>>,
    recorded: Rc<RefCell<KeyShapes>>,
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
            ckpt: Some(ckpt),
            recorded: Rc::new(RefCell::new(Vec::new())),
            prefix: String::new(),
            root: 0,
            kind,
            device,
            problems: Rc::new(RefCell::new(Vec::new())),
        }
    }
    /// A builder without a checkpoint: every weight is a zero-strided view of
    /// one scalar (no memory), and every requested key and shape is recorded
    /// ([`Self::recorded`]). Building a model with it lists the keys and
    /// shapes a config implies.
    pub fn dry(kind: Kind) -> Self {
        Self {
            ckpt: None,
            recorded: Rc::new(RefCell::new(Vec::new())),
            prefix: String::new(),
            root: 0,
            kind,
            device: Device::Cpu,
            problems: Rc::new(RefCell::new(Vec::new())),
        }
    }
    /// True for a dry-run builder.
    pub fn is_dry(&self) -> bool {
        self.ckpt.is_none()
    }
    /// Every (key, shape) requested so far, in order.
    pub fn recorded(&self) -> KeyShapes {
        self.recorded.borrow().clone()
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
    /// The same scope loading weights in `kind` (same problem list and records).
    pub fn with_kind(&self, kind: Kind) -> Self {
        let mut v = self.clone();
        v.kind = kind;
        v
    }
    /// Dtype weights are loaded in.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Device weights are loaded to.
    pub fn device(&self) -> Device {
        self.device
    }
    /// The checkpoint (`None` in dry-run mode).
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.ckpt.as_deref()
    }
    /// True when `name` exists here.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt
            .as_ref()
            .is_some_and(|c| c.contains(&self.key(name)))
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
        self.recorded
            .borrow_mut()
            .push((key.clone(), shape.to_vec()));
        let placeholder = || {
            // a zero-strided view: no allocation whatever the shape
            if shape.is_empty() {
                Tensor::zeros([], (kind, self.device))
            } else {
                Tensor::zeros([1], (kind, self.device)).expand(shape, false)
            }
        };
        let Some(ckpt) = &self.ckpt else {
            return placeholder();
        };
        match ckpt.shape(&key) {
            None => self.problems.borrow_mut().push(format!("missing `{key}`")),
            Some(s) if s != shape => self
                .problems
                .borrow_mut()
                .push(format!("`{key}` has shape {s:?}, expected {shape:?}")),
            Some(_) => match ckpt.load(&key, kind, self.device) {
                Ok(t) => return t,
                Err(e) => self.problems.borrow_mut().push(e.to_string()),
            },
        }
        placeholder()
    }
    /// Errors with every recorded problem (first few by name, and the count).
    pub fn finish(&self, what: &str) -> Result<()> {
        let p = self.problems.borrow();
        if p.is_empty() {
            return Ok(());
        }
        Err(SdxlError::Checkpoint {
            path: self
                .ckpt
                .as_ref()
                .map(|c| c.path().to_path_buf())
                .unwrap_or_default(),
            reason: format!(
                "{what}: {} problem(s): {}{}",
                p.len(),
                p.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
                if p.len() > 5 { "; …" } else { "" }
            ),
        })
    }
}
