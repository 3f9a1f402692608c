//! Text-to-image with an SDXL-family model and any attached LoRAs, started
//! from the same noise as ComfyUI's KSampler for the same seed.
//!
//! ```no_run
//! use lora_sdxl::sample::txt2img::{txt2img, GenerateParams};
//! use lora_sdxl::{ClipTokenizer, SdxlModel};
//! # fn main() -> lora_sdxl::Result<()> {
//! let model = SdxlModel::load("sdxl.safetensors", tch::Kind::Half, tch::Device::Cuda(0))?;
//! let lora = lora_core::LoraSet::load("my_lora.safetensors")?;
//! model.attach_lora(lora, 0.8)?;
//! let params = GenerateParams {
//!     prompt: "myakumyaku-san, 1girl, beach".into(),
//!     ..GenerateParams::default()
//! };
//! let images = txt2img(&model, &ClipTokenizer::new(), &params, &mut |_| {})?;
//! images[0].save("out.png").unwrap();
//! # Ok(()) }
//! ```

use crate::error::{Result, SdxlError};
use crate::model::conditioning::{encode_prompt, time_ids, y_vector};
use crate::model::schedule::NoiseSchedule;
use crate::model::sdxl::SdxlModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::sample::samplers::{sample_ddim, sample_sigmas, ModelSigmas, Sampler, SamplerSpec};
use image::RgbImage;
use lora_core::Prediction;
use tch::{Device, Kind, Tensor};

/// Everything that defines an image besides the model and LoRAs.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt (encoded like any prompt, as ComfyUI does; empty is allowed).
    pub negative: String,
    /// Sampler steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1 = no guidance, one model call per step).
    pub cfg: f64,
    /// Sampler and σ schedule.
    pub sampler: SamplerSpec,
    /// Seed of the initial (and ancestral) noise.
    pub seed: u64,
    /// Width in pixels (multiple of 8).
    pub width: u32,
    /// Height in pixels (multiple of 8).
    pub height: u32,
    /// Images per call; image `i` starts from slice `i` of one seeded draw.
    pub batch_size: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative: String::new(),
            steps: 25,
            cfg: 7.0,
            sampler: SamplerSpec::default(),
            seed: 0,
            width: 1024,
            height: 1024,
            batch_size: 1,
        }
    }
}

impl GenerateParams {
    /// Checks ranges; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: String| Err(SdxlError::Param { name, reason });
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v < 64 || v % 8 != 0 || v > 8192 {
                return bad(
                    name,
                    format!("{v} must be a multiple of 8 between 64 and 8192"),
                );
            }
        }
        if self.steps == 0 || self.steps > 1000 {
            return bad(
                "steps",
                format!("{} must be between 1 and 1000", self.steps),
            );
        }
        if !self.cfg.is_finite() || self.cfg < 0.0 {
            return bad("cfg", format!("{} must be a number ≥ 0", self.cfg));
        }
        if self.batch_size == 0 || self.batch_size > 64 {
            return bad(
                "batch_size",
                format!("{} must be between 1 and 64", self.batch_size),
            );
        }
        Ok(())
    }
}

/// The initial noise ComfyUI's KSampler uses for `seed`: torch's CPU
/// generator seeded with `seed`, one `randn` of `[batch, 4, h/8, w/8]` (fp32).
///
/// This seeds libtorch's global generator (as `torch.manual_seed` does).
pub fn initial_noise(seed: u64, width: u32, height: u32, batch: usize) -> Tensor {
    tch::manual_seed(seed as i64);
    Tensor::randn(
        [batch as i64, 4, height as i64 / 8, width as i64 / 8],
        (Kind::Float, Device::Cpu),
    )
}

/// One prompt's UNet conditioning: `context` `[1, 77·k, 2048]`, `y` `[1, adm]`.
#[derive(Debug)]
pub struct PromptConditioning {
    /// Cross-attention context.
    pub context: Tensor,
    /// Pooled text + size vector.
    pub y: Tensor,
}

/// Encodes a prompt with SDXL's size conditioning for a `width`×`height`
/// image (original = target size, no crop, as ComfyUI does by default).
pub fn condition(
    model: &SdxlModel,
    tok: &ClipTokenizer,
    prompt: &str,
    width: u32,
    height: u32,
) -> Result<PromptConditioning> {
    let device = model.unet_device();
    let c = tch::no_grad(|| encode_prompt(tok, &model.te1, &model.te2, prompt, false))?;
    let ids = time_ids((height, width), (0, 0), (height, width), device);
    Ok(PromptConditioning {
        y: y_vector(&c.pooled, &ids),
        context: c.context,
    })
}

pub(crate) fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Repeats a context along its tokens to `len` (a multiple of its length):
/// attention over k copies of the same tokens equals attention over one, so
/// prompts of different chunk counts can share a batch (ComfyUI does this).
pub(crate) fn repeat_tokens(ctx: &Tensor, len: i64) -> Tensor {
    let l = ctx.size()[1];
    if l == len {
        ctx.shallow_clone()
    } else {
        ctx.repeat([1, len / l, 1])
    }
}

/// Samples latents (in the model's latent space, i.e. VAE latents ×
/// scaling factor) from `noise` `[B, 4, h, w]` (CPU or device, unit variance).
/// Deterministic for a given noise and seed (the seed drives the ancestral
/// noise of `euler_ancestral`, as in ComfyUI).
pub fn sample_latents(
    model: &SdxlModel,
    positive: &PromptConditioning,
    negative: &PromptConditioning,
    params: &GenerateParams,
    noise: &Tensor,
    on_step: &mut dyn FnMut(usize),
) -> Result<Tensor> {
    params.validate()?;
    let device = model.unet_device();
    let schedule = NoiseSchedule::sdxl(model.detected.zero_terminal_snr);
    let sigmas = ModelSigmas::new(&schedule);
    let v_pred = model.detected.prediction == Prediction::V;
    let b = noise.size()[0];
    let guided = params.cfg != 1.0;
    // Conditioning for the whole run, batched once: [uncond…, cond…].
    let (ctx, y) = if guided {
        let (lp, ln) = (positive.context.size()[1], negative.context.size()[1]);
        let len = lp / gcd(lp, ln) * ln;
        let ctx = Tensor::cat(
            &[
                repeat_tokens(&negative.context, len).expand([b, len, -1], false),
                repeat_tokens(&positive.context, len).expand([b, len, -1], false),
            ],
            0,
        );
        let y = Tensor::cat(
            &[
                negative.y.expand([b, -1], false),
                positive.y.expand([b, -1], false),
            ],
            0,
        );
        (ctx, y)
    } else {
        (
            positive.context.expand([b, -1, -1], false),
            positive.y.expand([b, -1], false),
        )
    };
    let (ctx, y) = (ctx.to_device(device), y.to_device(device));
    let cfg = params.cfg;
    // Raw model output (ε or v) with guidance at integer timestep `t`.
    let mut model_out = |x_in: &Tensor, t: usize| -> Tensor {
        let n = if guided { 2 * b } else { b };
        let ts = Tensor::full([n], t as f64, (Kind::Float, device));
        let inp = if guided {
            Tensor::cat(&[x_in, x_in], 0)
        } else {
            x_in.shallow_clone()
        };
        let out = model.unet.forward(&inp, &ts, &ctx, &y).to_kind(Kind::Float);
        if guided {
            let parts = out.chunk(2, 0);
            &parts[0] + (&parts[1] - &parts[0]) * cfg
        } else {
            out
        }
    };
    let noise = noise.to_device(device).to_kind(Kind::Float);
    let latents = tch::no_grad(|| {
        if params.sampler.sampler == Sampler::Ddim {
            return sample_ddim(
                &sigmas,
                params.steps,
                v_pred,
                noise,
                &mut model_out,
                on_step,
            );
        }
        let list = sigmas.sigmas(params.sampler.schedule, params.steps);
        let x = &noise * (1.0 + list[0] * list[0]).sqrt();
        let mut denoise = |x: &Tensor, s: f64| -> Tensor {
            let c_in = 1.0 / (s * s + 1.0).sqrt();
            let out = model_out(&(x * c_in), sigmas.timestep(s));
            if v_pred {
                x * (1.0 / (s * s + 1.0)) - out * (s * c_in)
            } else {
                x - out * s
            }
        };
        // ComfyUI's ancestral noise: a generator seeded with the seed, drawn
        // with the latent's shape on its device.
        tch::manual_seed(params.seed as i64);
        let shape = noise.size();
        let mut draw = || Tensor::randn(shape.as_slice(), (Kind::Float, device));
        sample_sigmas(
            params.sampler.sampler,
            &list,
            x,
            &mut denoise,
            &mut draw,
            on_step,
        )
    });
    Ok(latents)
}

/// Decodes model-space latents `[B, 4, h, w]` to 8-bit RGB images the way
/// ComfyUI saves them (clamp to [0, 1], ×255, truncate). The VAE runs in
/// fp32 or bf16 (an fp16 model keeps its VAE in fp32).
pub fn decode_images(model: &SdxlModel, latents: &Tensor) -> Result<Vec<RgbImage>> {
    let scale = model.vae.config.scaling_factor;
    let mut out = Vec::new();
    for i in 0..latents.size()[0] {
        let z = latents.narrow(0, i, 1).to_device(model.unet_device()) / scale;
        let img = tch::no_grad(|| model.vae.decode(&z));
        let px = ((img + 1.0) / 2.0)
            .clamp(0.0, 1.0)
            .g_mul_scalar(255.0)
            .to_kind(Kind::Uint8)
            .squeeze_dim(0)
            .permute([1, 2, 0])
            .contiguous()
            .to_device(Device::Cpu);
        let (h, w) = (px.size()[0] as u32, px.size()[1] as u32);
        let buf = Vec::<u8>::try_from(&px.reshape([-1]))?;
        out.push(RgbImage::from_raw(w, h, buf).expect("buffer sized for the image"));
    }
    Ok(out)
}

/// Generates `params.batch_size` images with the model as it is (with any
/// attached LoRAs at their strengths). `on_step(i)` follows the sampler.
pub fn txt2img(
    model: &SdxlModel,
    tok: &ClipTokenizer,
    params: &GenerateParams,
    on_step: &mut dyn FnMut(usize),
) -> Result<Vec<RgbImage>> {
    params.validate()?;
    let pos = condition(model, tok, &params.prompt, params.width, params.height)?;
    let neg = if params.cfg != 1.0 {
        condition(model, tok, &params.negative, params.width, params.height)?
    } else {
        PromptConditioning {
            context: pos.context.shallow_clone(),
            y: pos.y.shallow_clone(),
        }
    };
    let noise = initial_noise(params.seed, params.width, params.height, params.batch_size);
    let latents = sample_latents(model, &pos, &neg, params, &noise, on_step)?;
    decode_images(model, &latents)
}
