//! CLIP BPE tokenizer (vocabulary bundled by `instant-clip-tokenizer`) and
//! SDXL's 75-token chunking.
//!
//! Text is cleaned as OpenCLIP does (HTML entities unescaped, whitespace
//! collapsed), lower-cased and BPE-encoded. A prompt longer than 75 tokens is
//! split into chunks of 75 (ComfyUI style); every chunk becomes
//! `[BOS, ≤75 tokens, EOS, pad…]` of length 77. CLIP-L pads with EOS, bigG with 0.

use instant_clip_tokenizer::{Token, Tokenizer};

/// Beginning-of-text id.
pub const BOS: i64 = 49406;
/// End-of-text id.
pub const EOS: i64 = 49407;
/// Tokens per chunk between BOS and EOS.
pub const CHUNK: usize = 75;
/// Length of one encoded chunk.
pub const CONTEXT: usize = 77;

/// The CLIP tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClipTokenizer")
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

fn clean(text: &str) -> String {
    let mut t = text.to_string();
    for _ in 0..2 {
        t = t
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&#x27;", "'");
    }
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl ClipTokenizer {
    /// The tokenizer with OpenAI's CLIP vocabulary (49408 tokens).
    pub fn new() -> Self {
        Self {
            inner: Tokenizer::new(),
        }
    }

    /// Token ids of `text`, without BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut out: Vec<Token> = Vec::new();
        self.inner.encode(&clean(text), &mut out);
        out.into_iter().map(|t| t.to_u16() as i64).collect()
    }

    /// `text` as one or more 77-token chunks padded with `pad`.
    pub fn chunks(&self, text: &str, pad: i64) -> Vec<[i64; CONTEXT]> {
        let ids = self.encode(text);
        let mut chunks = Vec::new();
        let mut parts: Vec<&[i64]> = ids.chunks(CHUNK).collect();
        if parts.is_empty() {
            parts.push(&[]);
        }
        for part in parts {
            let mut c = [pad; CONTEXT];
            c[0] = BOS;
            c[1..1 + part.len()].copy_from_slice(part);
            c[1 + part.len()] = EOS;
            chunks.push(c);
        }
        chunks
    }
}
