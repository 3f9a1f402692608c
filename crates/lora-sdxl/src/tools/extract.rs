//! Extracting a LoRA from two checkpoints — what kohya's
//! `extract_lora_from_models.py` does: for every module a LoRA can adapt,
//! ΔW = W_tuned − W_base is approximated at the requested rank (leading
//! singular vectors; see [`lora_core::adapter_from_delta`]), so a fine-tune
//! (e.g. WAI-illustrious over Illustrious) becomes a LoRA for its base.
//!
//! Text encoders are included only when they differ by more than
//! `min_diff` somewhere (kohya's rule: fine-tunes often leave them as they
//! are); 3x3 convs only when a conv rank is given. Modules whose weights are
//! identical are left out.
//!
//! ```no_run
//! use lora_sdxl::{extract_lora, ExtractOptions};
//! use std::path::Path;
//!
//! let (base, tuned) = (Path::new("illustrious.safetensors"), Path::new("wai.safetensors"));
//! let opts = ExtractOptions { rank: 32, ..Default::default() };
//! let x = extract_lora(base, tuned, &opts, &mut |done, total| eprint!("\r{done}/{total}"))?;
//! let meta = x.metadata("wai-lora", &opts, base, tuned);
//! x.set.save("wai-lora.safetensors", tch::Kind::Half, &meta)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::model::config::ClipLayout;
use crate::model::keys::weight_location_in;
use crate::model::sdxl::{detect, Detected};
use crate::model::targets::{lora_targets, Target, TargetScope};
use crate::model::weights::Checkpoint;
use crate::{Result, SdxlError};
use lora_core::resize::{adapter_from_delta, ResizeStats};
use lora_core::{Component, LoraSet, ModuleKey};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Options of [`extract_lora`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractOptions {
    /// Rank of Linear and 1x1-conv modules.
    pub rank: i64,
    /// Rank of 3x3 convs (LoCon); `None` leaves the convs out.
    pub conv_rank: Option<i64>,
    /// Clamp `up`/`down` values to ± this quantile of them (kohya: 0.99);
    /// `None` or 1 for no clamping.
    pub clamp_quantile: Option<f64>,
    /// Text encoders are extracted only when some weight differs by more
    /// than this (kohya: 0.01).
    pub min_diff: f64,
    /// Where the differences and SVDs are computed.
    pub device: Device,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            rank: 32,
            conv_rank: None,
            clamp_quantile: Some(0.99),
            min_diff: 0.01,
            device: Device::Cpu,
        }
    }
}

/// What [`extract_lora`] produced.
#[derive(Debug)]
pub struct Extracted {
    /// The LoRA (kohya names, alpha = rank).
    pub set: LoraSet,
    /// Per extracted module: full rank of ΔW, rank kept, share of ‖ΔW‖_F kept.
    pub modules: Vec<(ModuleKey, ResizeStats)>,
    /// Modules left out because base and tuned weights are identical.
    pub identical: usize,
    /// Largest |ΔW| over the text encoders' adaptable weights.
    pub text_encoder_max_diff: f64,
    /// Whether the text encoders were extracted.
    pub text_encoders: bool,
    /// The base model's detection result.
    pub base: Detected,
}

impl Extracted {
    /// kohya-style metadata for the extracted file: the minimal `ss_*` keys
    /// kohya's extractor writes (network module, dim/alpha = rank, conv
    /// args, base model version) and the SAI model spec, with `title` and a
    /// comment naming both models.
    pub fn metadata(
        &self,
        title: &str,
        opts: &ExtractOptions,
        base: &Path,
        tuned: &Path,
    ) -> std::collections::BTreeMap<String, String> {
        use lora_core::metadata::{iso8601, now_unix, py_bool, py_float};
        let name = |p: &Path| {
            p.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut args = serde_json::Map::new();
        if let Some(c) = opts.conv_rank {
            args.insert("conv_dim".into(), c.to_string().into());
            args.insert("conv_alpha".into(), py_float(c as f64).into());
        }
        let prediction = match self.base.prediction {
            lora_core::Prediction::Epsilon => "epsilon",
            lora_core::Prediction::V => "v",
        };
        [
            ("ss_v2", py_bool(false)),
            ("ss_base_model_version", "sdxl_base_v1-0".into()),
            ("ss_network_module", "networks.lora".into()),
            ("ss_network_dim", opts.rank.to_string()),
            ("ss_network_alpha", py_float(opts.rank as f64)),
            (
                "ss_network_args",
                serde_json::Value::Object(args).to_string(),
            ),
            ("ss_output_name", title.to_string()),
            ("ss_sd_model_name", name(base)),
            (
                "ss_training_comment",
                format!("extracted by lorakit: {} minus {}", name(tuned), name(base)),
            ),
            ("modelspec.sai_model_spec", "1.0.1".into()),
            (
                "modelspec.architecture",
                "stable-diffusion-xl-v1-base/lora".into(),
            ),
            (
                "modelspec.implementation",
                "https://github.com/Stability-AI/generative-models".into(),
            ),
            ("modelspec.title", title.to_string()),
            ("modelspec.date", iso8601(now_unix())),
            ("modelspec.resolution", "1024x1024".into()),
            ("modelspec.prediction_type", prediction.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

struct Side<'a> {
    ck: &'a Checkpoint,
    te2_layout: ClipLayout,
}

impl Side<'_> {
    fn weight(&self, t: &Target, device: Device) -> Result<Tensor> {
        let loc =
            weight_location_in(&t.key, self.te2_layout).ok_or_else(|| SdxlError::Checkpoint {
                path: self.ck.path().to_path_buf(),
                reason: format!("no checkpoint key known for module {}", t.key.kohya_name()),
            })?;
        let w = self.ck.load(&loc.key, Kind::Float, device)?;
        let w = match loc.fused_part {
            Some(part) => w.narrow(0, part as i64 * t.out_features, t.out_features),
            None => w,
        };
        let want = t.weight_shape();
        if w.size() != want {
            return Err(SdxlError::Checkpoint {
                path: self.ck.path().to_path_buf(),
                reason: format!("`{}` has shape {:?}, expected {want:?}", loc.key, w.size()),
            });
        }
        Ok(w)
    }
}

/// Extracts `tuned − base` as a LoRA for `base`. Both must be SDXL-family
/// checkpoints of the same architecture (single files or diffusers
/// folders). `progress(done, total)` is called after each module.
pub fn extract_lora(
    base: &Path,
    tuned: &Path,
    opts: &ExtractOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Extracted> {
    for (name, r) in [("rank", Some(opts.rank)), ("conv_rank", opts.conv_rank)] {
        if let Some(r) = r {
            if r < 1 {
                return Err(SdxlError::Param {
                    name,
                    reason: format!("must be at least 1, got {r}"),
                });
            }
        }
    }
    let ck_base = Checkpoint::open(base)?;
    let ck_tuned = Checkpoint::open(tuned)?;
    let d_base = detect(&ck_base)?;
    let d_tuned = detect(&ck_tuned)?;
    if d_base.config != d_tuned.config {
        return Err(SdxlError::Checkpoint {
            path: tuned.to_path_buf(),
            reason: format!(
                "its architecture differs from the base model {} (UNet {} vs {} model channels, text encoders {}+{} vs {}+{} layers): extraction needs a fine-tune of the same model",
                base.display(),
                d_tuned.config.unet.model_channels,
                d_base.config.unet.model_channels,
                d_tuned.config.te1.layers,
                d_tuned.config.te2.layers,
                d_base.config.te1.layers,
                d_base.config.te2.layers,
            ),
        });
    }
    let sides = [
        Side {
            ck: &ck_base,
            te2_layout: d_base.te2_layout,
        },
        Side {
            ck: &ck_tuned,
            te2_layout: d_tuned.te2_layout,
        },
    ];
    let diff = |t: &Target| -> Result<Tensor> {
        Ok(sides[1].weight(t, opts.device)? - sides[0].weight(t, opts.device)?)
    };
    let scope = TargetScope {
        unet: true,
        unet_conv: true,
        te1: true,
        te2: true,
    };
    let targets: Vec<Target> = lora_targets(&d_base.config, scope)
        .into_iter()
        .filter(|t| opts.conv_rank.is_some() || !t.uses_conv_rank())
        .collect();
    // One pass, each ΔW computed once. kohya's rule — the text encoders
    // only when they really differ somewhere — is applied at the end.
    let mut set = LoraSet::new();
    let mut modules = Vec::new();
    let mut identical = 0;
    let mut te_max = 0f64;
    for (i, t) in targets.iter().enumerate() {
        let delta = diff(t)?;
        let max = delta.abs().max().double_value(&[]);
        if t.key.component != Component::Unet {
            te_max = te_max.max(max);
        }
        if max == 0.0 {
            identical += 1;
        } else {
            let rank = if t.uses_conv_rank() {
                opts.conv_rank.unwrap_or(opts.rank)
            } else {
                opts.rank
            };
            let (a, st) = adapter_from_delta(&delta, rank, t.geometry, opts.clamp_quantile)
                .map_err(|e| SdxlError::Param {
                    name: "extract",
                    reason: format!("{}: {e}", t.key.kohya_name()),
                })?;
            set.insert(t.key.clone(), a);
            modules.push((t.key.clone(), st));
        }
        progress(i + 1, targets.len());
    }
    let text_encoders = te_max > opts.min_diff;
    if !text_encoders {
        modules.retain(|(k, _)| k.component == Component::Unet);
        for t in targets
            .iter()
            .filter(|t| t.key.component != Component::Unet)
        {
            set.remove(&t.key);
        }
    }
    if set.is_empty() {
        return Err(SdxlError::Checkpoint {
            path: tuned.to_path_buf(),
            reason: format!(
                "no adaptable weight differs from {}: nothing to extract (is it the same model?)",
                base.display()
            ),
        });
    }
    tracing::info!(
        modules = set.len(),
        identical,
        text_encoders,
        "extracted LoRA"
    );
    Ok(Extracted {
        set,
        modules,
        identical,
        text_encoder_max_diff: te_max,
        text_encoders,
        base: d_base,
    })
}
