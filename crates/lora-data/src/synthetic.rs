//! A small synthetic dataset for the built-in demo and tests: a recognisable
//! "character" (a round orange body with two eyes and a blue hat) in varied
//! positions, sizes, poses and backgrounds, with booru-style tag captions
//! that start with a trigger word.

use crate::error::{DataError, Result};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use std::path::Path;

const BACKGROUNDS: &[(&str, [u8; 3])] = &[
    ("white background", [240, 240, 235]),
    ("blue background", [70, 110, 200]),
    ("green background", [80, 160, 90]),
    ("pink background", [230, 150, 190]),
    ("grey background", [128, 128, 128]),
];

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
        let (bg_name, bg) = BACKGROUNDS[rng.gen_range(0..BACKGROUNDS.len())];
        let scale: f32 = rng.gen_range(0.22..0.38);
        let r = scale * w.min(h) as f32;
        let cx = rng.gen_range(r..(w as f32 - r));
        let cy = rng.gen_range(r * 1.3..(h as f32 - r));
        let looking_left = rng.gen_bool(0.5);
        let mut img = RgbImage::from_fn(w, h, |_, y| {
            // subtle vertical gradient on the background
            let t = y as f32 / h as f32;
            Rgb(bg.map(|c| (c as f32 * (0.85 + 0.15 * t)) as u8))
        });
        for (x, y, px) in img.enumerate_pixels_mut() {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let d = (dx * dx + dy * dy).sqrt();
            if d < r {
                *px = Rgb([235, 140, 40]); // body
            }
            // hat: a triangle above the body
            let top = cy - r * 1.35;
            if (y as f32) > top && (y as f32) < cy - r * 0.8 && dx.abs() < (y as f32 - top) * 0.7 {
                *px = Rgb([40, 60, 170]);
            }
            let eye_dx = if looking_left { -r * 0.2 } else { r * 0.2 };
            for ex in [-r * 0.35, r * 0.35] {
                let (ex, ey) = (cx + ex + eye_dx, cy - r * 0.15);
                let e = ((x as f32 - ex).powi(2) + (y as f32 - ey).powi(2)).sqrt();
                if e < r * 0.16 {
                    *px = Rgb([255, 255, 255]);
                }
                if e < r * 0.08 {
                    *px = Rgb([20, 20, 20]);
                }
            }
        }
        let size_tag = if scale > 0.3 { "close-up" } else { "full body" };
        let pose = if looking_left {
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
        let caption =
            format!("{trigger}, solo, round body, blue hat, {pose}, {size_tag}, {bg_name}");
        let cpath = dir.join(format!("{stem}.txt"));
        std::fs::write(&cpath, caption).map_err(|e| DataError::io(&cpath, e))?;
        stems.push(stem);
    }
    Ok(stems)
}
