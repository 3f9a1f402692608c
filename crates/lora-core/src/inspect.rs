//! A human-readable summary of a LoRA file (`lorakit lora inspect`).

use crate::adapter::Geometry;
use crate::formats::{LoadedLora, LoraFormat};
use crate::metadata::py_float;
use crate::naming::Component;
use std::collections::BTreeMap;
use std::fmt;

/// Module counts of one component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentCounts {
    /// Linear modules.
    pub linear: usize,
    /// 1x1 convolutions.
    pub conv1x1: usize,
    /// kxk convolutions (LoCon).
    pub conv_kxk: usize,
    /// LyCORIS modules by algorithm (`loha`, `lokr`): a file gives their
    /// update's matrix, not the layer's kind, so they are counted apart.
    pub lycoris: BTreeMap<&'static str, usize>,
}

impl ComponentCounts {
    /// All modules.
    pub fn total(&self) -> usize {
        self.linear + self.conv1x1 + self.conv_kxk + self.lycoris.values().sum::<usize>()
    }
}

/// Everything `lora inspect` prints.
#[derive(Debug, Clone)]
pub struct LoraSummary {
    /// File path.
    pub path: String,
    /// Detected format.
    pub format: LoraFormat,
    /// File size in bytes.
    pub file_size: u64,
    /// Tensor dtypes and counts.
    pub dtypes: BTreeMap<String, usize>,
    /// Module counts per component.
    pub components: BTreeMap<Component, ComponentCounts>,
    /// (rank, alpha) → modules.
    pub rank_alpha: BTreeMap<(i64, String), usize>,
    /// Total adapter parameters.
    pub parameters: i64,
    /// Selected metadata, label → value.
    pub metadata: Vec<(String, String)>,
    /// Most frequent tags from `ss_tag_frequency` (tag, images).
    pub top_tags: Vec<(String, u64)>,
    /// Number of metadata keys.
    pub metadata_keys: usize,
    /// Unknown keys.
    pub unknown_keys: Vec<String>,
    /// Warnings raised while loading.
    pub warnings: Vec<String>,
    /// sha256 of the data section.
    pub data_sha256: String,
}

impl LoraSummary {
    /// Summarises a loaded file.
    pub fn new(l: &LoadedLora) -> Self {
        let mut components: BTreeMap<Component, ComponentCounts> = BTreeMap::new();
        let mut rank_alpha = BTreeMap::new();
        for (k, a) in l.set.iter() {
            let c = components.entry(k.component).or_default();
            if let Some(l) = a.lyco() {
                *c.lycoris.entry(l.algo()).or_default() += 1;
            } else {
                match a.geometry() {
                    Geometry::Linear => c.linear += 1,
                    g if g.is_spatial_conv() => c.conv_kxk += 1,
                    _ => c.conv1x1 += 1,
                }
            }
            *rank_alpha
                .entry((a.rank(), py_float(a.alpha())))
                .or_default() += 1;
        }
        let md = &l.metadata;
        let mut metadata = Vec::new();
        let mut add = |label: &str, keys: &[&str]| {
            if let Some(v) = keys
                .iter()
                .find_map(|k| md.get(*k))
                .filter(|v| !v.is_empty() && *v != "None")
            {
                metadata.push((label.to_string(), v.clone()));
            }
        };
        add("name", &["ss_output_name", "modelspec.title"]);
        add(
            "base model",
            &["ss_base_model_version", "modelspec.architecture"],
        );
        add("trained on", &["ss_sd_model_name"]);
        add("steps", &["ss_steps"]);
        add("epoch", &["ss_epoch"]);
        add("resolution", &["ss_resolution", "modelspec.resolution"]);
        add("trigger", &["modelspec.trigger_phrase"]);
        add("network dim/alpha", &["ss_network_dim"]);
        add("network alpha", &["ss_network_alpha"]);
        add("network args", &["ss_network_args"]);
        add("learning rate", &["ss_learning_rate"]);
        add("prediction", &["modelspec.prediction_type"]);
        add("seed", &["ss_seed"]);
        add(
            "saved by",
            &["modelspec.implementation_version", "software"],
        );
        add("sshs_model_hash", &["sshs_model_hash"]);
        if let Some(pos) = metadata.iter().position(|(l, _)| l == "network dim/alpha") {
            if let Some(a) = md.get("ss_network_alpha") {
                metadata[pos].1 = format!("{} / {}", metadata[pos].1, a);
            }
            metadata.retain(|(l, _)| l != "network alpha");
        }
        let mut tags: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(tf) = md.get("ss_tag_frequency") {
            if let Ok(serde_json::Value::Object(dirs)) =
                serde_json::from_str::<serde_json::Value>(tf)
            {
                for (_, v) in dirs {
                    if let serde_json::Value::Object(t) = v {
                        for (tag, n) in t {
                            *tags.entry(tag).or_default() += n.as_u64().unwrap_or(0);
                        }
                    }
                }
            }
        }
        let mut top_tags: Vec<(String, u64)> = tags.into_iter().collect();
        top_tags.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top_tags.truncate(10);
        Self {
            path: l.path.display().to_string(),
            format: l.format,
            file_size: l.file_size,
            dtypes: l.dtypes.clone(),
            components,
            rank_alpha,
            parameters: l.set.num_parameters(),
            metadata,
            top_tags,
            metadata_keys: md.len(),
            unknown_keys: l.unknown_keys.clone(),
            warnings: l.warnings.clone(),
            data_sha256: l.data_sha256.clone(),
        }
    }
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

impl fmt::Display for LoraSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file:       {}", self.path)?;
        writeln!(f, "format:     {}", self.format)?;
        let dt: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} ×{n}"))
            .collect();
        writeln!(
            f,
            "size:       {} ({} tensors: {})",
            human_bytes(self.file_size),
            self.dtypes.values().sum::<usize>(),
            dt.join(", ")
        )?;
        writeln!(f, "parameters: {}", self.parameters)?;
        writeln!(f, "modules:")?;
        for (c, n) in &self.components {
            let lycoris: String = (n.lycoris.iter())
                .map(|(algo, k)| format!("{algo} {k}"))
                .collect::<Vec<_>>()
                .join(", ");
            if lycoris.is_empty() {
                writeln!(
                    f,
                    "  {:<5} {:>5}  (linear {}, conv 1x1 {}, conv kxk {})",
                    c.short_name(),
                    n.total(),
                    n.linear,
                    n.conv1x1,
                    n.conv_kxk
                )?;
            } else {
                writeln!(f, "  {:<5} {:>5}  ({lycoris})", c.short_name(), n.total())?;
            }
        }
        writeln!(f, "rank / alpha:")?;
        for ((r, a), n) in &self.rank_alpha {
            // a LoKr whose factors are both full has no rank
            let r = if *r == 0 {
                "full".to_string()
            } else {
                r.to_string()
            };
            writeln!(f, "  rank {r:<4} alpha {a:<8} {n:>5} modules")?;
        }
        if !self.metadata.is_empty() {
            writeln!(f, "metadata ({} keys):", self.metadata_keys)?;
            for (k, v) in &self.metadata {
                writeln!(f, "  {k:<18} {v}")?;
            }
        } else {
            writeln!(f, "metadata:   none")?;
        }
        if !self.top_tags.is_empty() {
            let t: Vec<String> = self
                .top_tags
                .iter()
                .map(|(t, n)| format!("{t} ({n})"))
                .collect();
            writeln!(f, "top tags:   {}", t.join(", "))?;
        }
        writeln!(f, "data sha256: {}", self.data_sha256)?;
        if !self.unknown_keys.is_empty() {
            writeln!(
                f,
                "UNKNOWN KEYS ({}), ignored by lorakit:",
                self.unknown_keys.len()
            )?;
            for k in self.unknown_keys.iter().take(20) {
                writeln!(f, "  {k}")?;
            }
            if self.unknown_keys.len() > 20 {
                writeln!(f, "  … and {} more", self.unknown_keys.len() - 20)?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}
