//! SDXL text and size conditioning.
//!
//! * context = concat(CLIP-L penultimate hidden state, bigG penultimate hidden
//!   state) → 2048 channels, 77 tokens per 75-token chunk;
//! * pooled = bigG's final-LN state at the first EOS × text projection, from
//!   chunk 0;
//! * `y` = pooled + sinusoidal embeddings of (original size, crop top-left,
//!   target size);
//! * an empty negative prompt is all zeros, as SDXL does.

use crate::clip::ClipTextModel;
use crate::error::{Result, SdxlError};
use crate::tokenizer::{ClipTokenizer, EOS};
use crate::unet::vector_conditioning;
use tch::{Device, Kind, Tensor};

/// Encoded text for one prompt.
#[derive(Debug)]
pub struct TextConditioning {
    /// `[1, 77·chunks, h1 + h2]`.
    pub context: Tensor,
    /// `[1, p]`.
    pub pooled: Tensor,
}

/// Token ids `[chunks, 77]` for one encoder.
pub fn token_ids(tok: &ClipTokenizer, prompt: &str, pad: i64, device: Device) -> Tensor {
    let chunks = tok.chunks(prompt, pad);
    let flat: Vec<i64> = chunks.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .view([chunks.len() as i64, 77])
        .to_device(device)
}

/// Encodes a prompt with both text encoders. An empty (or whitespace-only)
/// prompt with `zero_if_empty` gives all-zero context and pooled vectors.
pub fn encode_prompt(
    tok: &ClipTokenizer,
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    prompt: &str,
    zero_if_empty: bool,
) -> Result<TextConditioning> {
    let device = te1.config_device();
    let (h1, h2) = (te1.config.hidden, te2.config.hidden);
    let p = te2.config.projection_dim.unwrap_or(h2);
    if zero_if_empty && prompt.trim().is_empty() {
        return Ok(TextConditioning {
            context: Tensor::zeros([1, 77, h1 + h2], (Kind::Float, device)),
            pooled: Tensor::zeros([1, p], (Kind::Float, device)),
        });
    }
    for te in [te1, te2] {
        if te.config.vocab_size <= EOS {
            return Err(SdxlError::Checkpoint {
                path: Default::default(),
                reason: format!(
                    "this text encoder has a reduced vocabulary ({} tokens); prompts need CLIP's 49408",
                    te.config.vocab_size
                ),
            });
        }
    }
    let ids1 = token_ids(tok, prompt, EOS, device);
    let ids2 = token_ids(tok, prompt, 0, device);
    let n = ids1.size()[0];
    let o1 = te1.forward(&ids1);
    let o2 = te2.forward(&ids2);
    let context = Tensor::cat(
        &[
            o1.penultimate.to_kind(Kind::Float),
            o2.penultimate.to_kind(Kind::Float),
        ],
        -1,
    )
    .reshape([1, n * 77, h1 + h2]);
    let pooled = o2.pooled.narrow(0, 0, 1).to_kind(Kind::Float);
    Ok(TextConditioning { context, pooled })
}

/// `[1, 6]` size/crop ids `[H₀, W₀, top, left, H, W]`.
pub fn time_ids(
    original_hw: (u32, u32),
    crop_top_left: (u32, u32),
    target_hw: (u32, u32),
    device: Device,
) -> Tensor {
    let v = [
        original_hw.0,
        original_hw.1,
        crop_top_left.0,
        crop_top_left.1,
        target_hw.0,
        target_hw.1,
    ]
    .map(|x| x as f32);
    Tensor::from_slice(&v).view([1, 6]).to_device(device)
}

/// `y` for the UNet from a prompt's pooled vector and size ids.
pub fn y_vector(pooled: &Tensor, time_ids: &Tensor) -> Tensor {
    vector_conditioning(pooled, time_ids)
}
