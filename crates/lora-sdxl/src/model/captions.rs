//! Training captions as kohya's sd-scripts encodes them
//! (`--max_token_length`, sdxl-arch.md §3): every caption of a run gets the
//! same sequence length, so a caption encodes to the same conditioning alone
//! or in any batch (the text-embedding cache and a plain run agree).
//!
//! * `max_token_length = 75` (default): `[BOS] + 75 tokens + [EOS]`, padded
//!   to 77; longer captions are truncated.
//! * `150` / `225`: ids padded to `L = max + 2`, cut into `n = max / 75`
//!   chunks `[ids[0]] + ids[1+75k .. 76+75k] + [ids[L-1]]` (bigG, whose pad is
//!   not EOS: a chunk whose last content token is not EOS/pad ends in EOS, a
//!   chunk starting with pad starts with EOS), each chunk encoded, and the
//!   states rejoined as chunk 0's first + every chunk's 75 middle + the last
//!   chunk's last: `T = 75·n + 2`. Pooled from chunk 0.
//!
//! Prompts for sampling use ComfyUI's unlimited chunking instead
//! ([`super::conditioning::encode_batch`]).

use super::clip::ClipTextModel;
use super::conditioning::{check_vocabulary, encode_chunks, TextConditioning};
use super::tokenizer::{ClipTokenizer, BOS, CHUNK, EOS};
use crate::error::Result;
use tch::Tensor;

/// The lengths kohya accepts for `max_token_length`.
pub const MAX_TOKEN_LENGTHS: [usize; 3] = [75, 150, 225];

/// The `[n, 77]` chunks of one caption for an encoder padding with `pad`.
pub fn caption_chunks(
    tok: &ClipTokenizer,
    caption: &str,
    max_tokens: usize,
    pad: i64,
) -> Vec<[i64; 77]> {
    let len = max_tokens + 2;
    let mut ids = Vec::with_capacity(len);
    ids.push(BOS);
    ids.extend(tok.encode(caption).into_iter().take(max_tokens));
    ids.push(EOS);
    ids.resize(len, pad);
    let n = max_tokens / CHUNK;
    (0..n)
        .map(|k| {
            let mut c = [pad; 77];
            c[0] = ids[0];
            c[1..76].copy_from_slice(&ids[1 + CHUNK * k..1 + CHUNK * (k + 1)]);
            c[76] = ids[len - 1];
            if pad != EOS {
                if c[75] != EOS && c[75] != pad {
                    c[76] = EOS;
                }
                if c[1] == pad {
                    c[1] = EOS;
                }
            }
            c
        })
        .collect()
}

/// Encodes training captions: `[B, 75·n + 2, h1 + h2]` context and `[B, p]`
/// pooled, `n = max_tokens / 75` for every caption.
pub fn encode_captions(
    tok: &ClipTokenizer,
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    captions: &[String],
    max_tokens: usize,
) -> Result<TextConditioning> {
    check_vocabulary(te1, te2)?;
    let device = te1.config_device();
    let n = (max_tokens / CHUNK).max(1) as i64;
    let b = captions.len() as i64;
    let ids = |pad: i64| {
        let flat: Vec<i64> = captions
            .iter()
            .flat_map(|c| caption_chunks(tok, c, max_tokens, pad))
            .flatten()
            .collect();
        // a step's token ids: pinned and copied without a host sync
        crate::device::upload(Tensor::from_slice(&flat).view([b * n, 77]), device)
    };
    let (states, pooled) = encode_chunks(te1, te2, &ids(EOS), &ids(0), b, n);
    let h = states.size()[3];
    let context = if n == 1 {
        states.select(1, 0)
    } else {
        let first = states.select(1, 0).narrow(1, 0, 1);
        let middle = states
            .narrow(2, 1, CHUNK as i64)
            .reshape([b, n * CHUNK as i64, h]);
        let last = states.select(1, n - 1).narrow(1, 76, 1);
        Tensor::cat(&[first, middle, last], 1)
    };
    Ok(TextConditioning { context, pooled })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(n: usize) -> String {
        (0..n).map(|_| "cat").collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn chunks_follow_kohyas_rules() {
        let tok = ClipTokenizer::new();
        let cat = tok.encode("cat")[0];
        // 75: one chunk, truncated, EOS last
        let c = caption_chunks(&tok, &words(100), 75, 0);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0][0], c[0][75], c[0][76]), (BOS, cat, EOS));
        // 150, short caption, bigG (pad 0): chunk 1 starts with EOS, not pad
        let c = caption_chunks(&tok, &words(3), 150, 0);
        assert_eq!(c.len(), 2);
        assert_eq!(&c[0][..6], &[BOS, cat, cat, cat, EOS, 0]);
        assert_eq!((c[1][0], c[1][1], c[1][2], c[1][76]), (BOS, EOS, 0, 0));
        // CLIP-L pads with EOS: no fix-ups needed or made
        let c = caption_chunks(&tok, &words(3), 150, EOS);
        assert_eq!((c[1][1], c[1][2]), (EOS, EOS));
        // 150, 100 tokens, bigG: chunk 0 is full and ends in EOS; chunk 1 holds the rest
        let c = caption_chunks(&tok, &words(100), 150, 0);
        assert_eq!((c[0][75], c[0][76]), (cat, EOS));
        assert_eq!(&c[1][1..26], &[cat; 25][..]);
        assert_eq!((c[1][25], c[1][26], c[1][27]), (cat, EOS, 0));
        // 225: three chunks
        assert_eq!(caption_chunks(&tok, "a", 225, 0).len(), 3);
    }
}
