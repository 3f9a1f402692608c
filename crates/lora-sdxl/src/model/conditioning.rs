//! SDXL text and size conditioning.
//!
//! * context = concat(CLIP-L penultimate hidden state, bigG penultimate hidden
//!   state) → 2048 channels, 77 tokens per 75-token chunk;
//! * pooled = bigG's final-LN state at the first EOS × text projection, from
//!   chunk 0;
//! * `y` = pooled + sinusoidal embeddings of (original size, crop top-left,
//!   target size);
//! * an empty negative prompt is all zeros, as SDXL does.

use crate::error::{Result, SdxlError};
use crate::model::clip::ClipTextModel;
use crate::model::tokenizer::{ClipTokenizer, EOS};
use crate::model::unet::vector_conditioning;
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
    encode_batch(tok, te1, te2, &[prompt.to_string()])
}

/// Encodes several prompts at once: `[B, 77·n, h1 + h2]` context, where `n`
/// is the largest chunk count in the batch (shorter prompts get empty
/// `[BOS, EOS, pad…]` chunks), and `[B, p]` pooled vectors from chunk 0.
pub fn encode_batch(
    tok: &ClipTokenizer,
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    prompts: &[String],
) -> Result<TextConditioning> {
    check_vocabulary(te1, te2)?;
    let device = te1.config_device();
    let (h1, h2) = (te1.config.hidden, te2.config.hidden);
    let b = prompts.len() as i64;
    let c1: Vec<_> = prompts.iter().map(|p| tok.chunks(p, EOS)).collect();
    let n = c1.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let ids = |pad: i64, chunks: Vec<Vec<[i64; 77]>>| {
        let mut flat: Vec<i64> = Vec::with_capacity(prompts.len() * n * 77);
        for mut c in chunks {
            while c.len() < n {
                let mut e = [pad; 77];
                e[0] = crate::model::tokenizer::BOS;
                e[1] = EOS;
                c.push(e);
            }
            flat.extend(c.iter().flatten());
        }
        Tensor::from_slice(&flat)
            .view([b * n as i64, 77])
            .to_device(device)
    };
    let ids1 = ids(EOS, c1);
    let ids2 = ids(0, prompts.iter().map(|p| tok.chunks(p, 0)).collect());
    let n = n as i64;
    let (states, pooled) = encode_chunks(te1, te2, &ids1, &ids2, b, n);
    let context = states.reshape([b, n * 77, h1 + h2]);
    Ok(TextConditioning { context, pooled })
}

/// Both encoders over `b · n` 77-token chunks (`ids1` for CLIP-L, `ids2`
/// for bigG, `[b·n, 77]`): the concatenated penultimate states
/// `[b, n, 77, h1 + h2]` and chunk 0's pooled vector `[b, p]`, in fp32.
pub(crate) fn encode_chunks(
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    ids1: &Tensor,
    ids2: &Tensor,
    b: i64,
    n: i64,
) -> (Tensor, Tensor) {
    let o1 = te1.forward(ids1);
    let o2 = te2.forward(ids2);
    let states = Tensor::cat(
        &[
            o1.penultimate.to_kind(Kind::Float),
            o2.penultimate.to_kind(Kind::Float),
        ],
        -1,
    );
    let h = states.size()[2];
    let p = o2.pooled.size()[1];
    let pooled = o2.pooled.to_kind(Kind::Float).view([b, n, p]).select(1, 0);
    (states.view([b, n, 77, h]), pooled)
}

/// Refuses text encoders whose vocabulary cannot hold CLIP's token ids
/// (the tiny parity fixtures have reduced vocabularies).
pub(crate) fn check_vocabulary(te1: &ClipTextModel, te2: &ClipTextModel) -> Result<()> {
    for te in [te1, te2] {
        if te.config.vocab_size <= EOS {
            return Err(SdxlError::Param {
                name: "model.name_or_path",
                reason: format!(
                    "the checkpoint's text encoder has a reduced vocabulary ({} tokens); prompts need CLIP's 49408: use a full SDXL checkpoint",
                    te.config.vocab_size
                ),
            });
        }
    }
    Ok(())
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
