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
