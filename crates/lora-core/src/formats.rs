//! Loading LoRA files written by other tools and normalising them to a
//! [`LoraSet`] under lorakit's internal names.
//!
//! Recognised spellings (per tensor):
//!
//! | format | module name | tensors |
//! |---|---|---|
//! | kohya | `lora_unet_<LDM path>` / `lora_te1_…` / `lora_te2_…` | `.lora_down.weight`, `.lora_up.weight`, `.alpha` |
//! | AI Toolkit | `lora_unet_<diffusers path>` | same as kohya |
//! | diffusers / PEFT | `unet.<diffusers path>`, `text_encoder.…`, `text_encoder_2.…` | `.lora_A.weight`, `.lora_B.weight` (`.alpha` optional) |
//! | diffusers (old attn-procs) | `unet.…attn1.processor.to_q_lora`, `…mlp.fc1.lora_linear_layer` | `.down.weight`, `.up.weight` |
//!
//! Anything else is an unknown key, reported by name.

use crate::adapter::LoraAdapter;
use crate::error::{LoraError, Result};
use crate::io::{self, TensorFile};
use crate::naming::{attn_processor_to_module, Component, ModuleKey};
use crate::set::LoraSet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The on-disk convention a file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraFormat {
    /// kohya sd-scripts (LDM module names). What lorakit writes.
    Kohya,
    /// kohya tensor names over diffusers module paths (AI Toolkit's SDXL output).
    AiToolkit,
    /// diffusers / PEFT (`lora_A` / `lora_B`).
    Peft,
    /// Old diffusers attention-processor LoRA (`to_q_lora.down.weight`).
    DiffusersLegacy,
    /// LyCORIS LoHa / LoKr (`hada_w1_a`, `lokr_w1`, … under kohya module names).
    Lycoris,
    /// Keys of more than one of the above.
    Mixed,
}

impl std::fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya (LDM names)",
            LoraFormat::AiToolkit => "AI Toolkit (kohya tensors, diffusers module names)",
            LoraFormat::Peft => "diffusers/PEFT (lora_A/lora_B)",
            LoraFormat::DiffusersLegacy => "diffusers attention-processor (old)",
            LoraFormat::Lycoris => "LyCORIS (LoHa / LoKr, kohya names)",
            LoraFormat::Mixed => "mixed",
        })
    }
}

/// A LoRA file read and normalised.
#[derive(Debug)]
pub struct LoadedLora {
    /// The file.
    pub path: PathBuf,
    /// Detected format.
    pub format: LoraFormat,
    /// The adapters under internal names (tensors in their stored dtype, on CPU).
    pub set: LoraSet,
    /// The file's `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// File size in bytes.
    pub file_size: u64,
    /// Tensor count per stored dtype (`F16` → 2958, …).
    pub dtypes: BTreeMap<String, usize>,
    /// Keys no known format explains (empty when loaded strictly).
    pub unknown_keys: Vec<String>,
    /// Non-fatal problems (NaN/Inf weights…), one line each.
    pub warnings: Vec<String>,
    /// sha256 of the data section (equals `sshs_model_hash` for files saved by kohya or lorakit).
    pub data_sha256: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
    /// A LyCORIS LoHa / LoKr tensor (its key suffix).
    Lyco(&'static str),
    /// DoRA's magnitude (`dora_scale`).
    Dora,
}

struct Parsed {
    key: ModuleKey,
    part: Part,
    /// `None` when the spelling is shared by several formats.
    format: Option<LoraFormat>,
    /// The module name as the file spells it (for messages).
    module: String,
}

fn split_part<'a>(name: &'a str, suffixes: &[(&str, Part)]) -> Option<(&'a str, Part)> {
    suffixes
        .iter()
        .find_map(|(s, p)| name.strip_suffix(s).map(|m| (m, *p)))
}

fn parse_key(name: &str) -> Option<Parsed> {
    // kohya / AI Toolkit (and LyCORIS, which names modules as kohya does)
    if name.starts_with("lora_unet_") || name.starts_with("lora_te") {
        let lyco = crate::lycoris::KEYS
            .iter()
            .find_map(|s| (name.strip_suffix(s)?.strip_suffix('.')).map(|m| (m, Part::Lyco(s))));
        let (module, part) = match lyco {
            Some(found) => found,
            None => split_part(
                name,
                &[
                    (".lora_down.weight", Part::Down),
                    (".lora_up.weight", Part::Up),
                    (".alpha", Part::Alpha),
                    (".dora_scale", Part::Dora),
                ],
            )?,
        };
        let (key, diffusers_layout) = ModuleKey::from_kohya_name(module)?;
        // Text-encoder names are the same in kohya and AI Toolkit files; only
        // UNet names tell the two apart.
        // an alpha under LDM names says nothing more (LyCORIS and kohya share it)
        let format = if matches!(part, Part::Lyco(_) | Part::Dora) {
            Some(LoraFormat::Lycoris)
        } else if diffusers_layout {
            Some(LoraFormat::AiToolkit)
        } else if key.component == Component::Unet && part != Part::Alpha {
            Some(LoraFormat::Kohya)
        } else {
            None
        };
        return Some(Parsed {
            key,
            part,
            format,
            module: module.to_string(),
        });
    }
    // diffusers / PEFT and legacy attn-procs
    let stripped = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (component, rest) = if let Some(r) = stripped.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = stripped.strip_prefix("text_encoder_2.") {
        (Component::Te2, r)
    } else if let Some(r) = stripped.strip_prefix("text_encoder.") {
        (Component::Te1, r)
    } else {
        return None;
    };
    let legacy =
        rest.contains("_lora.") || rest.contains(".lora.") || rest.contains(".lora_linear_layer.");
    if legacy {
        return parse_legacy(component, rest);
    }
    let (module, part) = split_part(
        rest,
        &[
            (".lora_A.weight", Part::Down),
            (".lora_B.weight", Part::Up),
            (".lora_A.default.weight", Part::Down),
            (".lora_B.default.weight", Part::Up),
            (".alpha", Part::Alpha),
        ],
    )?;
    let (key, _) = ModuleKey::from_path(component, module)?;
    Some(Parsed {
        key,
        part,
        // `<path>.alpha` is also how diffusers names alphas of plain modules in
        // its attn-processor files: an alpha alone does not tell the format.
        format: (part != Part::Alpha).then_some(LoraFormat::Peft),
        module: format!("{}.{module}", component.diffusers_prefix()),
    })
}

/// Old diffusers attention-processor spellings (`…processor.to_q_lora.down.weight`).
fn parse_legacy(component: Component, rest: &str) -> Option<Parsed> {
    // diffusers names the alphas of attn-processor modules `<module>.down.weight.alpha`
    // and those of plain modules `<path>.alpha`.
    let (module, part) = split_part(
        rest,
        &[
            (".down.weight.alpha", Part::Alpha),
            (".down.weight", Part::Down),
            (".up.weight", Part::Up),
            (".alpha", Part::Alpha),
        ],
    )?;
    let path = match attn_processor_to_module(module, component) {
        Some(p) => p,
        None if part == Part::Alpha => module.to_string(),
        None => return None,
    };
    let (key, _) = ModuleKey::from_path(component, &path)?;
    Some(Parsed {
        key,
        part,
        format: Some(LoraFormat::DiffusersLegacy),
        module: format!("{}.{module}", component.diffusers_prefix()),
    })
}

/// Key prefixes of model weights (not LoRA tensors), strongest evidence first.
const MODEL_MARKERS: &[(&str, &str)] = &[
    (
        "model.diffusion_model.",
        "a full Stable Diffusion checkpoint (UNet weights `model.diffusion_model.*`)",
    ),
    (
        "conditioner.embedders.",
        "a full SDXL checkpoint (text encoders `conditioner.embedders.*`)",
    ),
    (
        "first_stage_model.",
        "a checkpoint or VAE (`first_stage_model.*`)",
    ),
    (
        "cond_stage_model.",
        "an SD1/SD2 checkpoint (`cond_stage_model.*`)",
    ),
    ("encoder.down.", "a VAE"),
    ("decoder.up.", "a VAE"),
    (
        "down_blocks.",
        "a diffusers model weight file (UNet or VAE), not a LoRA",
    ),
    ("text_model.", "a text-encoder weight file"),
];

/// What a non-LoRA file looks like: the strongest marker found among `keys`
/// and the key that shows it.
fn looks_like_model(keys: &[String]) -> Option<(&'static str, &str)> {
    MODEL_MARKERS.iter().find_map(|(prefix, what)| {
        keys.iter()
            .find(|k| k.starts_with(prefix))
            .map(|k| (*what, k.as_str()))
    })
}

/// How strictly [`load_lora`] treats keys it does not understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownKeys {
    /// Error listing the unknown keys (for training and applying).
    #[default]
    Reject,
    /// Keep going; list them in [`LoadedLora::unknown_keys`] (for inspecting).
    Report,
}

/// Reads a LoRA file in any supported format and normalises it.
pub fn load_lora(path: impl AsRef<Path>, unknown: UnknownKeys) -> Result<LoadedLora> {
    let file = io::read_tensors(path.as_ref())?;
    normalise(file, unknown)
}

/// Normalises tensors already read from a file (see [`load_lora`]).
pub fn normalise(file: TensorFile, unknown: UnknownKeys) -> Result<LoadedLora> {
    let TensorFile {
        path,
        tensors,
        metadata,
        file_size,
        data_sha256,
    } = file;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut unknown_keys = Vec::new();
    let mut warnings = Vec::new();
    let mut formats = std::collections::BTreeSet::new();
    #[derive(Default)]
    struct Parts {
        module: String,
        down: Option<(String, Tensor)>,
        up: Option<(String, Tensor)>,
        alpha: Option<(String, Tensor)>,
        dora: Option<(String, Tensor)>,
        lyco: BTreeMap<&'static str, (String, Tensor)>,
    }
    let mut groups: BTreeMap<ModuleKey, Parts> = BTreeMap::new();
    let n_tensors = tensors.len();
    for (name, t) in tensors {
        *dtypes.entry(io::kind_name(t.kind())).or_default() += 1;
        let Some(p) = parse_key(&name) else {
            unknown_keys.push(name);
            continue;
        };
        formats.extend(p.format);
        let g = groups.entry(p.key.clone()).or_default();
        if g.module.is_empty() {
            g.module = p.module.clone();
        }
        let slot = match p.part {
            Part::Down => &mut g.down,
            Part::Up => &mut g.up,
            Part::Alpha => &mut g.alpha,
            Part::Dora => &mut g.dora,
            Part::Lyco(suffix) => {
                g.lyco.insert(suffix, (name, t));
                continue;
            }
        };
        if slot.is_some() {
            return Err(LoraError::BadModule {
                path,
                module: p.module,
                reason: format!(
                    "tensor `{name}` duplicates another tensor of the same module (the file names one module twice, e.g. in two layouts)"
                ),
            });
        }
        *slot = Some((name, t));
    }

    if groups.is_empty() {
        let first = unknown_keys.first().cloned().unwrap_or_default();
        if n_tensors == 0 {
            return Err(LoraError::NotALora {
                path,
                what: "the file holds no tensors".into(),
                key: String::new(),
            });
        }
        let (what, key) = looks_like_model(&unknown_keys)
            .map(|(w, k)| (w.to_string(), k.to_string()))
            .unwrap_or_else(|| {
                (
                    "no LoRA tensors (lora_down/lora_up or lora_A/lora_B) at all".to_string(),
                    first,
                )
            });
        return Err(LoraError::NotALora { path, what, key });
    }
    if let Some((what, key)) = looks_like_model(&unknown_keys) {
        return Err(LoraError::NotALora {
            path,
            what: format!("it mixes LoRA tensors with model weights ({what})"),
            key: key.to_string(),
        });
    }
    if unknown == UnknownKeys::Reject && !unknown_keys.is_empty() {
        return Err(LoraError::UnknownKeys {
            path,
            count: unknown_keys.len(),
            first: unknown_keys.iter().take(5).cloned().collect(),
        });
    }

    let mut set = LoraSet::new();
    for (key, g) in groups {
        let bad = |reason: String| LoraError::BadModule {
            path: path.clone(),
            module: g.module.clone(),
            reason,
        };
        let alpha = read_alpha(&g.alpha).map_err(bad)?;
        if !g.lyco.is_empty() && (g.down.is_some() || g.up.is_some()) {
            return Err(bad("mixes lora_down/lora_up with LyCORIS tensors".into()));
        }
        let mut named: BTreeMap<&str, Tensor> =
            g.lyco.into_iter().map(|(k, (_, t))| (k, t)).collect();
        named.extend(g.dora.map(|(_, t)| ("dora_scale", t)));
        if g.down.is_none() && g.up.is_none() && named.keys().any(|k| *k != "dora_scale") {
            let get = |k: &str| named.get(k).map(Tensor::shallow_clone);
            let adapter = LoraAdapter::from_named(&get, alpha)
                .map_err(|e| bad(e.to_string()))?
                .ok_or_else(|| {
                    bad("has LyCORIS tensors but neither hada_w1_a nor lokr_w1 / lokr_w1_a".into())
                })?;
            set.insert(key, adapter);
            continue;
        }
        let (down, up) = match (g.down, g.up) {
            (Some(d), Some(u)) => (d, u),
            (Some(_), None) => {
                return Err(bad(
                    "has lora_down but no lora_up (the file is incomplete)".into()
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "has lora_up but no lora_down (the file is incomplete)".into()
                ))
            }
            (None, None) => {
                return Err(bad("has an alpha but no lora_down/lora_up weights".into()))
            }
        };
        for (name, t) in [&down, &up] {
            if t.is_floating_point() {
                let finite = t.to_kind(Kind::Float).isfinite().all().int64_value(&[]) == 1;
                if !finite {
                    let msg = format!("{}: tensor `{name}` contains NaN or Inf values; this LoRA will produce broken images", path.display());
                    tracing::warn!("{msg}");
                    warnings.push(msg);
                }
            } else {
                return Err(bad(format!(
                    "`{name}` is not a floating-point tensor ({:?})",
                    t.kind()
                )));
            }
        }
        if let Some(a) = alpha {
            if !a.is_finite() {
                let msg = format!(
                    "{}: module `{}` has a non-finite alpha; treating it as alpha = rank",
                    path.display(),
                    g.module
                );
                tracing::warn!("{msg}");
                warnings.push(msg);
            }
        }
        named.insert("lora_down.weight", down.1);
        named.insert("lora_up.weight", up.1);
        let get = |k: &str| named.get(k).map(Tensor::shallow_clone);
        let adapter = LoraAdapter::from_named(&get, alpha)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("has no lora_down/lora_up weights".into()))?;
        set.insert(key, adapter);
    }
    // LyCORIS writes LoRA modules (with DoRA) under kohya's names
    if formats.contains(&LoraFormat::Lycoris) {
        formats.remove(&LoraFormat::Kohya);
    }
    let format = match formats.len() {
        0 => LoraFormat::Kohya, // text-encoder-only kohya file
        1 => *formats.iter().next().expect("one element"),
        _ => LoraFormat::Mixed,
    };
    Ok(LoadedLora {
        path,
        format,
        set,
        metadata,
        file_size,
        dtypes,
        unknown_keys,
        warnings,
        data_sha256,
    })
}

/// A module's alpha, when its file has one (one number).
fn read_alpha(alpha: &Option<(String, Tensor)>) -> std::result::Result<Option<f64>, String> {
    match alpha {
        None => Ok(None),
        Some((name, a)) if a.numel() != 1 => Err(format!(
            "`{name}` must hold one number, it has shape {:?}",
            a.size()
        )),
        Some((_, a)) => Ok(Some(
            a.to_kind(Kind::Double).reshape([1]).double_value(&[0]),
        )),
    }
}

impl LoraSet {
    /// Loads a LoRA file strictly (unknown keys are an error). Shorthand for
    /// `load_lora(path, UnknownKeys::Reject)?.set`.
    pub fn load(path: impl AsRef<Path>) -> Result<LoraSet> {
        Ok(load_lora(path, UnknownKeys::Reject)?.set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_spelling() {
        let cases = [
            ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight", LoraFormat::Kohya, "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha", LoraFormat::AiToolkit, "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", LoraFormat::Peft, "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight", LoraFormat::DiffusersLegacy, "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
            ("text_encoder_2.text_model.encoder.layers.31.mlp.fc2.lora_B.weight", LoraFormat::Peft, "text_model.encoder.layers.31.mlp.fc2"),
        ];
        for (name, fmt, path) in cases {
            let p = parse_key(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(p.format, Some(fmt), "{name}");
            assert_eq!(p.key.path, path, "{name}");
        }
        assert!(parse_key("lora_unet_input_blocks_4_1_proj_in.lora_mid.weight").is_none());
        assert!(parse_key("lora_unet_input_blocks_4_1_proj_in.dora_scale")
            .is_some_and(|p| p.part == Part::Dora));
        assert!(parse_key("model.diffusion_model.input_blocks.0.0.weight").is_none());
    }
}
