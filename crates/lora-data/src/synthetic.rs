//! A small synthetic dataset for the built-in demo and tests: the toy
//! world's "character" (a round orange body with two eyes and a blue hat,
//! see [`crate::toy_world`]) in varied positions, sizes, poses and
//! backgrounds, with booru-style tag captions that start with a trigger word
//! and — as the walkthrough teaches — name only what is *not* the character
//! (size, position, pose, background).

use crate::error::{DataError, Result};
use crate::toy_world::{render_character, Background, Character};
use rand::{Rng, SeedableRng};
use std::path::Path;

/// The backgrounds the dataset uses; [`HELD_OUT_BACKGROUNDS`] never appear
/// in it, so samples on them show whether the LoRA generalises.
pub const DATASET_BACKGROUNDS: [Background; 4] = [
    Background::White,
    Background::Grass,
    Background::Pink,
    Background::Grey,
];

/// Toy-world backgrounds that are not in the dataset.
pub const HELD_OUT_BACKGROUNDS: [Background; 3] =
    [Background::Sky, Background::Night, Background::Beach];

/// Writes `n` images (`w × h` PNG) and captions into `dir`; returns the file stems.
pub fn write_character_dataset(
    dir: &Path,
    n: usize,
    w: u32,
    h: u32,
    trigger: &str,
    seed: u64,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut stems = Vec::new();
    for i in 0..n {
        let bg = DATASET_BACKGROUNDS[rng.gen_range(0..DATASET_BACKGROUNDS.len())];
        let c = Character::random(&mut rng);
        let img = render_character(bg, &c, w, h);
        let pose = if c.looking_left {
            "looking to the side"
        } else {
            "looking at viewer"
        };
        let stem = format!("char_{i:03}");
        let path = dir.join(format!("{stem}.png"));
        img.save(&path).map_err(|e| DataError::Image {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let caption = format!(
            "{trigger}, {}, {}, {pose}, {}",
            c.size_tag(),
            c.position_tag(),
            bg.name()
        );
        let cpath = dir.join(format!("{stem}.txt"));
        std::fs::write(&cpath, caption).map_err(|e| DataError::io(&cpath, e))?;
        stems.push(stem);
    }
    Ok(stems)
}

/// A PNG whose header claims `width × height` 16-bit RGBA pixels while its
/// data is a few bytes: what a decompression bomb looks like to a header
/// check (a real one packs gigabytes of pixels into a small file). For
/// tests: lorakit must refuse it by name, before decoding anything.
///
/// ```
/// let png = lora_data::synthetic::bomb_png(13_376, 13_376);
/// assert!(png.len() < 100);
/// ```
pub fn bomb_png(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([16, 6, 0, 0, 0]); // 16-bit RGBA, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}
