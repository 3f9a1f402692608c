//! A pixel-statistics detector for toy-world images: which background, the
//! dominant colour of what stands on it, and whether the demo character
//! (a warm orange-to-red body with a blue hat above it) is there. The demo, the quality tests
//! and `examples/compare_grid` score generated samples with it.

use super::{dist2, Background, COLOURS, HAT, ORANGE};
use image::RgbImage;

/// A pixel belongs to the foreground when it is farther than this from
/// its row's background colour.
const FOREGROUND: i32 = 60 * 60;
/// A pixel has a palette colour when it is within this of it.
const MATCH: i32 = 48 * 48;
/// A pixel is hat blue when it is within this of [`HAT`]: the toy VAE
/// draws a trained LoRA's hat a little towards teal (measured (32, 97, 164)
/// to (57, 99, 155), 45–56 from the hat's colour, at demo steps 400–600).
/// It only counts above a body, which no world scene has.
const HAT_MATCH: i32 = 64 * 64;

/// What the detector sees in one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// The nearest background (by the picture's left and right edges).
    pub background: Background,
    /// Mean distance of the edge pixels to that background (0–441).
    pub background_error: f32,
    /// Fraction of the image that is not background.
    pub foreground: f32,
    /// The world colour most of the foreground has, with its share of the
    /// foreground (ties and a foreground under 2 % give `None`).
    pub colour: Option<(&'static str, f32)>,
    /// Fraction of the image that is a warm body colour (see [`is_body`]).
    pub body: f32,
    /// Fraction of the image that is hat blue *above* the body's centre.
    pub hat: f32,
}

impl Analysis {
    /// How much of the character is there, 0–1: the body (full marks at 5 %
    /// of the image) times the hat above it (full marks at 1 %).
    pub fn character_score(&self) -> f32 {
        (self.body / 0.05).min(1.0) * (self.hat / 0.01).min(1.0)
    }

    /// The character's body is there (at least 3 % of the image): what a
    /// short LoRA run teaches first, before the hat's colour.
    pub fn has_body(&self) -> bool {
        self.body >= 0.03
    }

    /// The character is there: a score of at least 0.5.
    pub fn has_character(&self) -> bool {
        self.character_score() >= 0.5
    }
}

/// A body pixel: the character's orange or the red-orange a short LoRA run
/// draws first (measured: about (190, 85, 75) after 300 demo steps at
/// strength 0.8) — red clearly above green, green above blue. The world's
/// red counts too; what no world scene has is the blue hat *above* it.
pub fn is_body(p: [u8; 3]) -> bool {
    let [r, g, b] = p.map(i32::from);
    dist2(p, ORANGE) <= MATCH || (r >= 140 && r - g >= 40 && r - b >= 60 && g + 25 >= b)
}

/// Analyses a toy-world image (any size).
pub fn analyse(img: &RgbImage) -> Analysis {
    let (w, h) = img.dimensions();
    let edge = (w / 16).max(1);
    let (background, background_error) = Background::ALL
        .iter()
        .map(|&bg| {
            let mut sum = 0f32;
            for y in 0..h {
                let row = bg.row_colour(y, h);
                for x in (0..edge).chain(w - edge..w) {
                    sum += (dist2(img.get_pixel(x, y).0, row) as f32).sqrt();
                }
            }
            (bg, sum / (2 * edge * h) as f32)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((Background::White, f32::MAX));
    let n = (w * h) as f32;
    let mut fg = 0usize;
    let mut counts = vec![0usize; COLOURS.len()];
    let (mut body, mut body_y) = (0usize, 0f64);
    let mut hats: Vec<u32> = Vec::new();
    for (_, y, p) in img.enumerate_pixels() {
        let p = p.0;
        if dist2(p, background.row_colour(y, h)) <= FOREGROUND {
            continue;
        }
        fg += 1;
        if let Some(i) = (0..COLOURS.len()).find(|&i| dist2(p, COLOURS[i].1) <= MATCH) {
            counts[i] += 1;
        }
        if is_body(p) {
            body += 1;
            body_y += y as f64;
        }
        if dist2(p, HAT) <= HAT_MATCH {
            hats.push(y);
        }
    }
    let hat = if body > 0 {
        let centre = body_y / body as f64;
        hats.iter().filter(|&&y| (y as f64) < centre).count()
    } else {
        0
    };
    let colour = if fg as f32 >= 0.02 * n {
        let best = (0..COLOURS.len()).max_by_key(|&i| counts[i]).unwrap_or(0);
        let tie = counts
            .iter()
            .enumerate()
            .any(|(i, &c)| i != best && c == counts[best]);
        (!tie).then(|| (COLOURS[best].0, counts[best] as f32 / fg as f32))
    } else {
        None
    };
    Analysis {
        background,
        background_error,
        foreground: fg as f32 / n,
        colour,
        body: body as f32 / n,
        hat: hat as f32 / n,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{render_character, Character, Scene, SIZE};
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_detector_reads_rendered_scenes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let s = Scene::random(&mut rng);
            let a = analyse(&s.render(SIZE, SIZE));
            assert_eq!(a.background, s.background, "{}", s.caption());
            assert!(!a.has_character(), "{}: {a:?}", s.caption());
            if let Some(o) = s.object {
                // a shape of the background's own colour can vanish
                if a.foreground > 0.02 {
                    assert_eq!(
                        a.colour.map(|c| c.0),
                        Some(COLOURS[o.colour].0),
                        "{}",
                        s.caption()
                    );
                }
            } else {
                assert_eq!(a.foreground, 0.0);
            }
        }
    }

    #[test]
    fn the_detector_finds_the_character_on_every_background() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for bg in Background::ALL {
            for _ in 0..10 {
                let c = Character::random(&mut rng);
                let a = analyse(&render_character(bg, &c, SIZE, SIZE));
                assert_eq!(a.background, bg);
                assert!(a.character_score() > 0.9, "{bg:?} {c:?}: {a:?}");
            }
            // and not on the bare background, nor with the hat missing (a plain circle)
            assert!(!analyse(&bg.render(SIZE, SIZE)).has_character());
        }
    }
}
