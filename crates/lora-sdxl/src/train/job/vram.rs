//! `train.vram`: presets for a GPU's memory, in the spirit of AI Toolkit's
//! `low_vram` and kohya's 8 GB SDXL recipe. A preset fills the memory
//! settings a job leaves unset — the keys a job sets always win — and caps
//! the pixels of a micro-batch, which is what activations grow with.
//!
//! | preset | gradient checkpointing | optimizer when unset | pixels per micro-batch |
//! |---|---|---|---|
//! | `8gb` | on | `adamw8bit` | 1 × 1024² |
//! | `12gb` | on | `adamw8bit` | 2 × 1024² |
//! | `16gb` | on | (job's default) | 4 × 1024² |
//! | `24gb` | on | (job's default) | 8 × 1024² |
//! | `max` | off | (job's default) | no cap |
//!
//! Every preset relies on latents being cached, which `train.cache_latents`
//! already is by default (so the VAE does not run in the step).
//!
//! The caps are provisional (peers' published figures: an SDXL UNet LoRA at
//! 1024² batch 1 with checkpointing and 8-bit AdamW fits 8 GB) until
//! `scripts/gpu-check.sh` measures each preset under a memory cap.

/// One preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VramPreset {
    /// Its name in the job file.
    pub name: &'static str,
    /// `train.gradient_checkpointing` when unset.
    pub gradient_checkpointing: bool,
    /// `train.optimizer` when unset (`None`: the job's default).
    pub optimizer: Option<&'static str>,
    /// At most this many pixels in a micro-batch (`batch_size` × the
    /// largest resolution²).
    pub max_batch_pixels: Option<u64>,
}

const MP_1024: u64 = 1024 * 1024;

/// Every preset, smallest first.
pub const PRESETS: [VramPreset; 5] = [
    preset("8gb", true, Some("adamw8bit"), Some(MP_1024)),
    preset("12gb", true, Some("adamw8bit"), Some(2 * MP_1024)),
    preset("16gb", true, None, Some(4 * MP_1024)),
    preset("24gb", true, None, Some(8 * MP_1024)),
    preset("max", false, None, None),
];

/// The names, for the field table.
pub const NAMES: [&str; 5] = ["8gb", "12gb", "16gb", "24gb", "max"];

const fn preset(
    name: &'static str,
    gradient_checkpointing: bool,
    optimizer: Option<&'static str>,
    max_batch_pixels: Option<u64>,
) -> VramPreset {
    VramPreset {
        name,
        gradient_checkpointing,
        optimizer,
        max_batch_pixels,
    }
}

/// The preset named `name`.
pub fn find(name: &str) -> Option<&'static VramPreset> {
    PRESETS.iter().find(|p| p.name == name)
}

impl VramPreset {
    /// Fills the `[train]` keys the job file leaves unset (`value` is the
    /// whole file as TOML, before it is read into a `JobConfig`).
    pub(crate) fn fill(&self, value: &mut toml::Value) {
        // the preset is a key of `[train]`, so the table is there
        let Some(train) = value.get_mut("train").and_then(|t| t.as_table_mut()) else {
            return;
        };
        let mut set = |key: &str, v: toml::Value| {
            train.entry(key).or_insert(v);
        };
        set(
            "gradient_checkpointing",
            toml::Value::Boolean(self.gradient_checkpointing),
        );
        if let Some(o) = self.optimizer {
            set("optimizer", toml::Value::String(o.into()));
        }
    }

    /// What the preset did, for the run's notes.
    pub fn note(&self) -> String {
        let cap = match self.max_batch_pixels {
            Some(m) => format!("at most {} × 1024² pixels per micro-batch", m / MP_1024),
            None => "no batch cap".into(),
        };
        format!(
            "train.vram = \"{}\": gradient checkpointing {}{} where the job leaves them unset; {cap}",
            self.name,
            if self.gradient_checkpointing { "on" } else { "off" },
            self.optimizer.map(|o| format!(", optimizer {o}")).unwrap_or_default()
        )
    }

    /// The error when `batch_size` images of `resolution`² exceed the cap.
    pub(crate) fn batch_error(&self, batch_size: usize, resolution: u32) -> Option<String> {
        let max = self.max_batch_pixels?;
        let pixels = batch_size as u64 * u64::from(resolution).pow(2);
        (pixels > max).then(|| {
            format!(
                "batch_size {batch_size} at {resolution} px is {:.1} megapixels per micro-batch; vram = \"{}\" allows {:.1} ({} × 1024²): lower train.batch_size and raise train.gradient_accumulation to keep the effective batch, or choose a larger train.vram",
                pixels as f64 / MP_1024 as f64,
                self.name,
                max as f64 / MP_1024 as f64,
                max / MP_1024
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_presets_agree() {
        assert_eq!(PRESETS.map(|p| p.name), NAMES);
    }

    #[test]
    fn the_cap_counts_pixels_not_images() {
        let p = find("8gb").unwrap();
        assert_eq!(p.batch_error(1, 1024), None);
        assert_eq!(p.batch_error(4, 512), None);
        let e = p.batch_error(2, 1024).unwrap();
        assert!(
            e.contains("2.0 megapixels") && e.contains("allows 1.0"),
            "{e}"
        );
        assert_eq!(find("max").unwrap().batch_error(64, 2048), None);
    }
}
