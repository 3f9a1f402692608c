//! Loading a whole SDXL-family checkpoint: architecture detection from keys
//! and shapes alone, clear errors for other model families and incomplete
//! files, and the four components with their LoRA slots.

use crate::error::{Result, SdxlError};
use crate::model::clip::{Activation, ClipTextModel};
use crate::model::config::{ClipConfig, ClipLayout, SdxlConfig, UnetConfig, VaeConfig};
use crate::model::keys::{TE1_PREFIX, TE2_HF_PREFIX, TE2_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::model::nn::Slots;
use crate::model::unet::Unet;
use crate::model::vae::Vae;
use crate::model::weights::{Checkpoint, VarBuilder};
use lora_core::{Component, Prediction};
use std::path::Path;
use std::rc::Rc;
use tch::{Device, Kind};

/// The device named by `cpu`, `cuda`, `cuda:N` (`None`: CUDA when
/// available, else CPU). CUDA requested but unavailable is an error.
pub fn resolve_device(spec: Option<&str>) -> std::result::Result<Device, String> {
    device_of(spec, tch::Cuda::device_count().max(0) as usize)
}

/// [`resolve_device`] on a machine with `gpus` CUDA devices (0: no CUDA).
///
/// ```
/// use lora_sdxl::model::sdxl::device_of;
/// use tch::Device;
/// assert_eq!(device_of(None, 0), Ok(Device::Cpu));
/// assert_eq!(device_of(Some("cuda:1"), 2), Ok(Device::Cuda(1)));
/// assert!(device_of(Some("cuda"), 0).is_err());
/// ```
pub fn device_of(spec: Option<&str>, gpus: usize) -> std::result::Result<Device, String> {
    let device = match spec.map(str::trim) {
        None | Some("") if gpus > 0 => Device::Cuda(0),
        None | Some("") | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => {
                return Err(format!(
                    "`{d}` is not a device: use \"cpu\", \"cuda\" or \"cuda:N\""
                ))
            }
        },
    };
    if let Device::Cuda(n) = device {
        if gpus == 0 {
            return Err("CUDA is not available in this libtorch/driver; use \"cpu\"".into());
        }
        if n >= gpus {
            return Err(format!("cuda:{n} does not exist ({gpus} CUDA device(s))"));
        }
    }
    Ok(device)
}

/// What a checkpoint file holds, judged from its keys and shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// The inferred configuration.
    pub config: SdxlConfig,
    /// ε or v prediction (from the `v_pred` marker key).
    pub prediction: Prediction,
    /// The `ztsnr` marker key is present (zero terminal SNR schedule).
    pub zero_terminal_snr: bool,
    /// Where `prediction` and `zero_terminal_snr` came from: the marker
    /// keys, a diffusers folder's `scheduler/scheduler_config.json`, or the
    /// SDXL default (ε, no rescale) when neither says.
    pub schedule_source: String,
    /// Keys that are not part of the four components (`position_ids`, EMA, …).
    pub extra_keys: Vec<String>,
    /// Parameter count per component.
    pub parameters: Vec<(Component, u64)>,
    /// VAE parameter count.
    pub vae_parameters: u64,
    /// Tensor count per stored dtype.
    pub dtypes: Vec<(String, usize)>,
    /// How text encoder 2 is stored (OpenCLIP in single files, HF in diffusers folders).
    pub te2_layout: ClipLayout,
}

impl Detected {
    /// Key prefix of text encoder 2 for its layout.
    pub fn te2_prefix(&self) -> &'static str {
        te2_prefix_for(self.te2_layout)
    }
}

fn has_prefix(ck: &Checkpoint, p: &str) -> bool {
    ck.infos().keys().any(|k| k.starts_with(p))
}

fn err(ck: &Checkpoint, reason: String) -> SdxlError {
    SdxlError::Checkpoint {
        path: ck.path().to_path_buf(),
        reason,
    }
}

/// Parameters under `prefix` in `(key, shape)` pairs (the buffers
/// `position_ids` and `logit_scale` are not parameters).
pub fn count_parameters_in<'a>(
    keys: impl IntoIterator<Item = (&'a str, &'a [i64])>,
    prefix: &str,
) -> u64 {
    keys.into_iter()
        .filter(|(k, _)| {
            k.starts_with(prefix) && !k.ends_with("position_ids") && !k.ends_with("logit_scale")
        })
        .map(|(_, s)| s.iter().product::<i64>().max(1) as u64)
        .sum()
}

/// Parameters under `prefix` in a checkpoint.
pub fn count_parameters(ck: &Checkpoint, prefix: &str) -> u64 {
    count_parameters_in(
        ck.infos()
            .iter()
            .map(|(k, i)| (k.as_str(), i.shape.as_slice())),
        prefix,
    )
}

/// The prediction type and zero-terminal-SNR flag a checkpoint declares, and
/// where that came from: a diffusers folder's `scheduler/scheduler_config.json`
/// (`prediction_type`, `rescale_betas_zero_snr`), else the `v_pred` / `ztsnr`
/// marker keys of single files, else SDXL's ε default.
fn schedule_of(ck: &Checkpoint) -> Result<(Prediction, bool, String)> {
    let config = ck.path().join("scheduler").join("scheduler_config.json");
    if ck.is_folder() && config.is_file() {
        let text = std::fs::read_to_string(&config).map_err(|e| SdxlError::io(&config, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| SdxlError::Checkpoint {
                path: config.clone(),
                reason: format!("not valid JSON: {e}"),
            })?;
        let prediction = match v.get("prediction_type").and_then(|p| p.as_str()) {
            None => Prediction::Epsilon,
            Some(name) => Prediction::parse(name).ok_or_else(|| SdxlError::Checkpoint {
                path: config.clone(),
                reason: format!(
                    "prediction_type `{name}` is not supported ({})",
                    Prediction::NAMES.join(" or ")
                ),
            })?,
        };
        let ztsnr = v
            .get("rescale_betas_zero_snr")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        return Ok((prediction, ztsnr, "scheduler/scheduler_config.json".into()));
    }
    let (v, z) = (ck.contains("v_pred"), ck.contains("ztsnr"));
    let source = if v || z {
        "the checkpoint's v_pred / ztsnr marker keys"
    } else {
        "the SDXL default (no v_pred / ztsnr marker)"
    };
    let prediction = if v {
        Prediction::V
    } else {
        Prediction::Epsilon
    };
    Ok((prediction, z, source.into()))
}

/// Recognises the model family and, for SDXL-family files, the configuration.
pub fn detect(ck: &Checkpoint) -> Result<Detected> {
    let sdxl = "lorakit trains SDXL-family models (SDXL 1.0, Illustrious, Pony, NoobAI…)";
    let any = |p: &str| has_prefix(ck, p);
    if ck.infos().is_empty() {
        return Err(err(ck, "the file holds no tensors".into()));
    }
    if any("lora_unet_")
        || any("lora_te")
        || ck
            .infos()
            .keys()
            .any(|k| k.ends_with(".lora_down.weight") || k.ends_with(".lora_A.weight"))
    {
        return Err(err(ck, "this is a LoRA file, not a base model checkpoint: pass it with --lora / [network], and the SDXL checkpoint as the model".into()));
    }
    if any(&format!("{UNET_PREFIX}joint_blocks.")) || any("joint_blocks.") {
        return Err(err(
            ck,
            format!("this looks like a Stable Diffusion 3 checkpoint (joint_blocks); {sdxl}"),
        ));
    }
    if any(&format!("{UNET_PREFIX}double_blocks.")) || any("double_blocks.") {
        return Err(err(
            ck,
            format!("this looks like a Flux checkpoint (double_blocks); {sdxl}"),
        ));
    }
    if any("cond_stage_model.transformer.") {
        return Err(err(ck, format!("this looks like a Stable Diffusion 1.x checkpoint (one CLIP-L text encoder, cond_stage_model); {sdxl}")));
    }
    if any("cond_stage_model.model.") {
        return Err(err(ck, format!("this looks like a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder, cond_stage_model); {sdxl}")));
    }
    if any("conditioner.embedders.0.model.") && !any(TE1_PREFIX) {
        return Err(err(ck, format!("this looks like the SDXL refiner (only an OpenCLIP-bigG text encoder); {sdxl}, base models rather than the refiner")));
    }
    if !any(UNET_PREFIX) {
        if any("down_blocks.") || any("encoder.down_blocks.") {
            return Err(err(ck, "this is a diffusers component file (diffusers key names), not a single-file checkpoint: pass the whole diffusers folder or a single-file .safetensors".into()));
        }
        return Err(err(
            ck,
            format!(
                "no UNet weights (`{UNET_PREFIX}…`): not a Stable Diffusion checkpoint; {sdxl}"
            ),
        ));
    }
    let unet = UnetConfig::infer(ck, UNET_PREFIX).ok_or_else(|| {
        err(
            ck,
            "the UNet weights do not have SDXL's layout (input_blocks.0.0, label_emb…)".into(),
        )
    })?;
    if !any(&format!("{UNET_PREFIX}label_emb.")) {
        return Err(err(
            ck,
            format!(
                "the UNet has no label_emb (size conditioning): not an SDXL-family model; {sdxl}"
            ),
        ));
    }
    let mut missing = Vec::new();
    if !any(TE1_PREFIX) {
        missing.push("text encoder 1 (CLIP-L, conditioner.embedders.0.transformer.*)");
    }
    let te2_layout = if any(TE2_PREFIX) {
        ClipLayout::OpenClip
    } else {
        ClipLayout::HuggingFace
    };
    let te2_prefix = te2_prefix_for(te2_layout);
    if !any(te2_prefix) {
        missing.push("text encoder 2 (OpenCLIP-bigG, conditioner.embedders.1.model.*)");
    }
    if !any(VAE_PREFIX) {
        missing.push("VAE (first_stage_model.*)");
    }
    if !missing.is_empty() {
        return Err(err(ck, format!(
            "the file has an SDXL UNet but is missing: {}. Use a full single-file checkpoint (UNet-only files cannot be trained on)",
            missing.join("; ")
        )));
    }
    let te1 = ClipConfig::infer(ck, TE1_PREFIX, ClipLayout::HuggingFace).ok_or_else(|| {
        err(
            ck,
            "text encoder 1 (CLIP-L) has an unexpected layout".into(),
        )
    })?;
    let te2 = ClipConfig::infer(ck, te2_prefix, te2_layout).ok_or_else(|| {
        err(
            ck,
            "text encoder 2 (OpenCLIP-bigG) has an unexpected layout".into(),
        )
    })?;
    let vae = VaeConfig::infer(ck, VAE_PREFIX)
        .ok_or_else(|| err(ck, "the VAE has an unexpected layout".into()))?;
    let extra_keys = ck
        .infos()
        .keys()
        .filter(|k| {
            ![UNET_PREFIX, TE1_PREFIX, te2_prefix, VAE_PREFIX]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .cloned()
        .collect();
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    for i in ck.infos().values() {
        *dtypes.entry(format!("{:?}", i.kind)).or_default() += 1;
    }
    let (prediction, zero_terminal_snr, schedule_source) = schedule_of(ck)?;
    Ok(Detected {
        config: SdxlConfig {
            unet,
            te1,
            te2,
            vae,
        },
        prediction,
        zero_terminal_snr,
        schedule_source,
        extra_keys,
        parameters: vec![
            (Component::Unet, count_parameters(ck, UNET_PREFIX)),
            (Component::Te1, count_parameters(ck, TE1_PREFIX)),
            (Component::Te2, count_parameters(ck, te2_prefix)),
        ],
        vae_parameters: count_parameters(ck, VAE_PREFIX),
        dtypes: dtypes.into_iter().collect(),
        te2_layout,
    })
}

/// An SDXL-family model: UNet, both text encoders, VAE, and every LoRA slot.
#[derive(Debug)]
pub struct SdxlModel {
    /// Detection result (config, prediction type…).
    pub detected: Detected,
    /// UNet.
    pub unet: Unet,
    /// Text encoder 1 (CLIP-L).
    pub te1: ClipTextModel,
    /// Text encoder 2 (OpenCLIP-bigG).
    pub te2: ClipTextModel,
    /// VAE.
    pub vae: Vae,
    /// LoRA slots of every module kohya adapts.
    pub slots: Slots,
}

impl SdxlModel {
    /// Gradient checkpointing for the UNet blocks and the text encoders'
    /// layers: activations are recomputed in backward instead of kept. The
    /// text encoders only run with gradients while they are trained, so it
    /// costs nothing there otherwise.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.unet.set_gradient_checkpointing(on);
        self.te1.set_gradient_checkpointing(on);
        self.te2.set_gradient_checkpointing(on);
    }

    /// Loads a single-file checkpoint (or a diffusers folder) with every weight converted to `kind`
    /// on `device` (norms stay fp32).
    pub fn load(path: impl AsRef<Path>, kind: Kind, device: Device) -> Result<Self> {
        let ck = Rc::new(Checkpoint::open(path)?);
        let detected = detect(&ck)?;
        let cfg = &detected.config;
        let vb = VarBuilder::new(ck.clone(), kind, device);
        let slots = Slots::default();
        let (unet, te1, te2, vae) = build(&vb, cfg, detected.te2_layout, &slots);
        vb.finish("the checkpoint does not match the SDXL structure inferred from it")?;
        let te2_prefix = detected.te2_prefix();
        let unexpected: Vec<String> = ck
            .unused_keys()
            .into_iter()
            .filter(|k| {
                [UNET_PREFIX, TE1_PREFIX, te2_prefix, VAE_PREFIX]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .filter(|k| !k.ends_with("position_ids") && !k.ends_with("logit_scale"))
            .collect();
        if !unexpected.is_empty() {
            return Err(SdxlError::Checkpoint {
                path: ck.path().to_path_buf(),
                reason: format!(
                    "{} unexpected key(s) for the SDXL structure inferred from the file: {}{}",
                    unexpected.len(),
                    unexpected
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if unexpected.len() > 5 { ", …" } else { "" }
                ),
            });
        }
        tracing::info!(path = %ck.path().display(), slots = slots.len(), "loaded SDXL model");
        Ok(Self {
            detected,
            unet,
            te1,
            te2,
            vae,
            slots,
        })
    }
}

impl SdxlModel {
    /// Device of the UNet weights.
    pub fn unet_device(&self) -> Device {
        self.unet.device()
    }
}

impl SdxlModel {
    /// The parity harness behind `examples/sdxl_forward.rs`: from whichever
    /// of `input_ids_1`, `input_ids_2`, `latents`, `timesteps`, `time_ids`,
    /// `image` are given, computes `te1_hidden`, `te2_hidden`, `te2_pooled`,
    /// `unet_eps` (needs ids, latents, timesteps, time_ids), `vae_mean`
    /// (needs image) and `vae_decoded` (needs latents). fp32 outputs.
    pub fn reference_outputs(
        &self,
        inputs: &std::collections::HashMap<String, tch::Tensor>,
    ) -> Result<Vec<(String, tch::Tensor)>> {
        use tch::Tensor;
        let dev = self.unet_device();
        let get = |k: &str| inputs.get(k).map(|t| t.to_device(dev));
        let mut out = Vec::new();
        tch::no_grad(|| {
            let o1 = get("input_ids_1").map(|ids| self.te1.forward(&ids.to_kind(Kind::Int64)));
            let o2 = get("input_ids_2").map(|ids| self.te2.forward(&ids.to_kind(Kind::Int64)));
            if let (Some(o1), Some(o2), Some(lat), Some(t), Some(ids)) =
                (&o1, &o2, get("latents"), get("timesteps"), get("time_ids"))
            {
                let ctx = Tensor::cat(
                    &[
                        o1.penultimate.to_kind(Kind::Float),
                        o2.penultimate.to_kind(Kind::Float),
                    ],
                    -1,
                );
                let y = crate::model::unet::vector_conditioning(&o2.pooled, &ids);
                out.push((
                    "unet_eps".to_string(),
                    self.unet.forward(&lat, &t, &ctx, &y),
                ));
            }
            if let Some(o1) = o1 {
                out.push(("te1_hidden".to_string(), o1.penultimate));
            }
            if let Some(o2) = o2 {
                out.push(("te2_hidden".to_string(), o2.penultimate));
                out.push(("te2_pooled".to_string(), o2.pooled));
            }
            if let Some(img) = get("image") {
                out.push(("vae_mean".to_string(), self.vae.encode_moments(&img).0));
            }
            if let Some(lat) = get("latents") {
                out.push(("vae_decoded".to_string(), self.vae.decode(&lat)));
            }
        });
        Ok(out
            .into_iter()
            .map(|(k, t)| {
                (
                    k,
                    t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous(),
                )
            })
            .collect())
    }
}

/// Every single-file key and shape a configuration implies (without the
/// buffers `position_ids` / `logit_scale`), found by building the model on a
/// dry-run [`VarBuilder`]: no weight memory is allocated.
pub fn expected_keys(cfg: &SdxlConfig) -> Vec<(String, Vec<i64>)> {
    let vb = VarBuilder::dry(Kind::Float);
    let _model = build(&vb, cfg, ClipLayout::OpenClip, &Slots::default());
    let mut keys = vb.recorded();
    keys.sort();
    keys
}

/// Builds the four components from `vb` (at the checkpoint root).
fn build(
    vb: &VarBuilder,
    cfg: &SdxlConfig,
    te2_layout: ClipLayout,
    slots: &Slots,
) -> (Unet, ClipTextModel, ClipTextModel, Vae) {
    let at = |prefix: &str| vb.pp(prefix.trim_end_matches('.'));
    let te2_prefix = te2_prefix_for(te2_layout);
    let unet = Unet::new(&at(UNET_PREFIX), &cfg.unet, slots);
    let te1 = ClipTextModel::new(
        &at(TE1_PREFIX),
        &cfg.te1,
        ClipLayout::HuggingFace,
        Activation::QuickGelu,
        Component::Te1,
        slots,
    );
    let te2 = ClipTextModel::new(
        &at(te2_prefix),
        &cfg.te2,
        te2_layout,
        Activation::Gelu,
        Component::Te2,
        slots,
    );
    // The VAE never runs in plain fp16 (SDXL's VAE overflows to NaN there):
    // an fp16 model keeps its VAE in fp32.
    let vae_vb = match vb.kind() {
        Kind::Half => at(VAE_PREFIX).with_kind(Kind::Float),
        _ => at(VAE_PREFIX),
    };
    let vae = Vae::new(&vae_vb, &cfg.vae);
    (unet, te1, te2, vae)
}

/// Key prefix of text encoder 2 in a layout (OpenCLIP in single files, HF in diffusers folders).
fn te2_prefix_for(layout: ClipLayout) -> &'static str {
    match layout {
        ClipLayout::OpenClip => TE2_PREFIX,
        ClipLayout::HuggingFace => TE2_HF_PREFIX,
    }
}
