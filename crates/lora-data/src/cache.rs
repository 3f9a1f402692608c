//! Content-keyed on-disk caches for VAE latents and text-encoder outputs.
//!
//! An entry's file name is the sha256 of a canonical key string that names
//! everything the cached value depends on. For latents: the image's content
//! hash (so editing the image can never reuse a stale latent), the bucket,
//! the crop box, the flip and the VAE's identity. For text embeddings: the
//! exact caption text and the text encoders' identity. The key string is also
//! stored inside the file and compared on read. Entries are safetensors files
//! written atomically; an unreadable entry is a miss (and is rewritten).
//! The cache lives under the run's output folder, never in the dataset.

use crate::buckets::{Bucket, CropBox};
use crate::error::{DataError, Result};
use lora_core::io::{read_tensors, serialize, write_atomic};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const KEY_FIELD: &str = "lorakit.cache_key";

/// What a cached latent depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentKey {
    /// sha256 of the image file bytes.
    pub image_hash: String,
    /// Bucket (w, h).
    pub bucket: Bucket,
    /// Crop box in original pixels.
    pub crop: CropBox,
    /// Mirrored.
    pub flip: bool,
    /// Identity of the VAE (e.g. a hash of its weights or of the checkpoint file).
    pub vae_id: String,
    /// Identity of the image's loss mask ([`crate::masks::Mask::cache_id`]),
    /// when it has one: the entry then holds the mask too.
    pub mask: Option<String>,
}

impl LatentKey {
    /// The canonical key string.
    pub fn canonical(&self) -> String {
        format!(
            "latent/v1 image={} bucket={}x{} crop={:.3},{:.3},{:.3},{:.3} flip={} vae={}",
            self.image_hash,
            self.bucket.0,
            self.bucket.1,
            self.crop.left,
            self.crop.top,
            self.crop.width,
            self.crop.height,
            self.flip,
            self.vae_id
        ) + &self
            .mask
            .as_ref()
            .map(|m| format!(" mask={m}"))
            .unwrap_or_default()
    }
}

/// What cached text-encoder outputs depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextKey {
    /// The exact caption fed to the encoders.
    pub caption: String,
    /// Identity of the text encoders.
    pub encoder_id: String,
}

impl TextKey {
    /// The canonical key string.
    pub fn canonical(&self) -> String {
        format!(
            "text/v1 encoders={} caption={}",
            self.encoder_id, self.caption
        )
    }
}

/// A folder of cache entries.
#[derive(Debug, Clone)]
pub struct TensorCache {
    dir: PathBuf,
}

impl TensorCache {
    /// A cache rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry for `canonical` lives.
    pub fn path_for(&self, canonical: &str) -> PathBuf {
        let h: String = Sha256::digest(canonical.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir
            .join(&h[..2])
            .join(format!("{}.safetensors", &h[..40]))
    }

    /// The cached tensors, or `None` on a miss (absent, unreadable, or written
    /// for a different key).
    pub fn get(&self, canonical: &str) -> Option<BTreeMap<String, Tensor>> {
        let path = self.path_for(canonical);
        if !path.exists() {
            return None;
        }
        match read_tensors(&path) {
            Ok(f) if f.metadata.get(KEY_FIELD).map(String::as_str) == Some(canonical) => {
                Some(f.tensors.into_iter().collect())
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "cache entry was written for another key; recomputing");
                None
            }
            Err(e) => {
                tracing::warn!("{e}; recomputing the cache entry");
                None
            }
        }
    }

    /// Stores tensors under `canonical` (atomically).
    pub fn put(&self, canonical: &str, tensors: &[(&str, &Tensor)]) -> Result<PathBuf> {
        let path = self.path_for(canonical);
        let owned: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.shallow_clone()))
            .collect();
        let meta = BTreeMap::from([(KEY_FIELD.to_string(), canonical.to_string())]);
        let bytes = serialize(&owned, &meta).map_err(|e| DataError::Cache {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(|e| DataError::Cache {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn key(hash: &str, vae: &str) -> LatentKey {
        LatentKey {
            image_hash: hash.into(),
            bucket: (512, 512),
            crop: CropBox {
                left: 10.0,
                top: 0.0,
                width: 600.0,
                height: 600.0,
            },
            flip: false,
            vae_id: vae.into(),
            mask: None,
        }
    }

    #[test]
    fn hit_miss_and_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TensorCache::new(dir.path().join("cache"));
        let t = Tensor::arange(8, (Kind::Float, Device::Cpu)).view([2, 4]);
        let k = key("aaa", "vae1").canonical();
        assert!(cache.get(&k).is_none());
        cache.put(&k, &[("latent", &t)]).unwrap();
        let got = cache.get(&k).unwrap();
        assert!(got["latent"].equal(&t));
        // another image content, another VAE, a flip: all misses
        assert!(cache.get(&key("bbb", "vae1").canonical()).is_none());
        assert!(cache.get(&key("aaa", "vae2").canonical()).is_none());
        let mut flipped = key("aaa", "vae1");
        flipped.flip = true;
        assert!(cache.get(&flipped.canonical()).is_none());
        // a mask (or another mask) is another entry
        let mut masked = key("aaa", "vae1");
        masked.mask = Some("m1".into());
        assert!(cache.get(&masked.canonical()).is_none());
        cache.put(&masked.canonical(), &[("latent", &t)]).unwrap();
        masked.mask = Some("m2".into());
        assert!(cache.get(&masked.canonical()).is_none());
        // a corrupt entry is a miss, then rewritten
        std::fs::write(cache.path_for(&k), b"garbage").unwrap();
        assert!(cache.get(&k).is_none());
        cache.put(&k, &[("latent", &t)]).unwrap();
        assert!(cache.get(&k).is_some());
        let t = TextKey {
            caption: "trig, 1girl".into(),
            encoder_id: "te".into(),
        };
        assert_ne!(cache.path_for(&t.canonical()), cache.path_for(&k));
    }
}
