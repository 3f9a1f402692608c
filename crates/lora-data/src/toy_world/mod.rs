//! The toy world: a procedurally generated picture world small enough to
//! train an SDXL-architecture model on from scratch on a CPU, so the demo
//! and the quality tests can show a LoRA teaching a real concept.
//!
//! A scene is one flat-coloured shape (circle, square, triangle, star) of a
//! named colour, size and horizontal position on one of seven backgrounds,
//! captioned with tags: `red circle, small, on the left, night`. The
//! demo's *character* (an orange round body with a blue hat and two eyes)
//! is drawn with the same backgrounds, but never appears in the world the
//! base model is trained on — and orange is not one of the world's colours.
//!
//! | concept | where |
//! |---|---|
//! | colours, shapes, sizes, positions, backgrounds, captions | this file |
//! | drawing a scene or the character | [`draw`] |
//! | recognising them in a generated image | [`detect`] |
//!
//! ```
//! use lora_data::toy_world::{Scene, SIZE};
//! use rand::SeedableRng;
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
//! let scene = Scene::random(&mut rng);
//! let img = scene.render(SIZE, SIZE);
//! assert_eq!(img.dimensions(), (64, 64));
//! assert!(scene.caption().ends_with(scene.background.name()));
//! ```

pub mod detect;
pub mod draw;

use image::RgbImage;
use rand::Rng;

pub use detect::{analyse, Analysis};
pub use draw::{render_character, Character};

/// The world's native resolution (64 px: 8×8 latents).
pub const SIZE: u32 = 64;

/// The world's shape colours (names as they appear in captions).
pub const COLOURS: &[(&str, [u8; 3])] = &[
    ("red", [215, 40, 40]),
    ("green", [40, 165, 70]),
    ("blue", [40, 70, 200]),
    ("yellow", [235, 205, 40]),
    ("purple", [140, 60, 190]),
    ("white", [250, 250, 250]),
    ("black", [20, 20, 20]),
];

/// The character's body colour: not a world colour, so only a LoRA can
/// teach it.
pub const ORANGE: [u8; 3] = [240, 140, 30];
/// The character's hat (the world's blue).
pub const HAT: [u8; 3] = [40, 70, 200];

/// The shapes of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

impl Shape {
    /// All shapes.
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }
}

/// Sizes: the shape's radius as a fraction of the image side.
pub const SIZES: &[(&str, f32)] = &[("small", 0.15), ("large", 0.29)];

/// Horizontal positions: the centre as a fraction of the width.
pub const POSITIONS: &[(&str, f32)] = &[
    ("on the left", 0.28),
    ("in the center", 0.5),
    ("on the right", 0.72),
];

/// The backgrounds (flat colours, vertical gradients, a two-band beach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    White,
    Grey,
    Pink,
    Grass,
    Sky,
    Night,
    Beach,
}

impl Background {
    /// All backgrounds.
    pub const ALL: [Background; 7] = [
        Background::White,
        Background::Grey,
        Background::Pink,
        Background::Grass,
        Background::Sky,
        Background::Night,
        Background::Beach,
    ];

    /// The caption tag.
    pub fn name(self) -> &'static str {
        match self {
            Background::White => "white background",
            Background::Grey => "grey background",
            Background::Pink => "pink background",
            Background::Grass => "grass",
            Background::Sky => "sky",
            Background::Night => "night",
            Background::Beach => "beach",
        }
    }

    /// The background's colour on row `y` of an image `h` rows high: every
    /// background is constant along a row, so the detector can subtract it.
    pub fn row_colour(self, y: u32, h: u32) -> [u8; 3] {
        let t = (y as f32 + 0.5) / h.max(1) as f32;
        let lerp = |a: [u8; 3], b: [u8; 3]| {
            [0, 1, 2].map(|i| (a[i] as f32 + (b[i] as f32 - a[i] as f32) * t).round() as u8)
        };
        match self {
            Background::White => [240, 240, 235],
            Background::Grey => [128, 128, 128],
            Background::Pink => [230, 150, 190],
            Background::Grass => lerp([120, 190, 95], [50, 120, 40]),
            Background::Sky => lerp([90, 150, 230], [205, 228, 250]),
            Background::Night => lerp([8, 12, 35], [30, 35, 80]),
            Background::Beach => {
                if t < 0.4 {
                    [30, 160, 160]
                } else {
                    [230, 210, 150]
                }
            }
        }
    }

    /// An image of the bare background.
    pub fn render(self, w: u32, h: u32) -> RgbImage {
        let rows: Vec<[u8; 3]> = (0..h).map(|y| self.row_colour(y, h)).collect();
        RgbImage::from_fn(w, h, |_, y| image::Rgb(rows[y as usize]))
    }
}

/// One shape in a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: Shape,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Index into [`POSITIONS`].
    pub position: usize,
    /// Centre as fractions of the image (x jitters around the position).
    pub centre: (f32, f32),
}

/// A world scene: a background and at most one shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub background: Background,
    pub object: Option<Object>,
}

impl Scene {
    /// A random scene (one in twelve has no shape, so the model learns the
    /// backgrounds alone).
    pub fn random(rng: &mut impl Rng) -> Self {
        let background = Background::ALL[rng.gen_range(0..Background::ALL.len())];
        if rng.gen_range(0..12) == 0 {
            return Self {
                background,
                object: None,
            };
        }
        let position = rng.gen_range(0..POSITIONS.len());
        let size = rng.gen_range(0..SIZES.len());
        let r = SIZES[size].1;
        let x = (POSITIONS[position].1 + rng.gen_range(-0.05..0.05)).clamp(r, 1.0 - r);
        let y = rng.gen_range((0.5 - (0.5 - r) * 0.6)..=(0.5 + (0.5 - r) * 0.6));
        Self {
            background,
            object: Some(Object {
                shape: Shape::ALL[rng.gen_range(0..Shape::ALL.len())],
                colour: rng.gen_range(0..COLOURS.len()),
                size,
                position,
                centre: (x, y),
            }),
        }
    }

    /// Tag caption: `red circle, small, on the left, night`, or just the
    /// background for an empty scene.
    pub fn caption(&self) -> String {
        match self.object {
            None => self.background.name().to_string(),
            Some(o) => format!(
                "{} {}, {}, {}, {}",
                COLOURS[o.colour].0,
                o.shape.name(),
                SIZES[o.size].0,
                POSITIONS[o.position].0,
                self.background.name()
            ),
        }
    }

    /// Draws the scene at `w × h`.
    pub fn render(&self, w: u32, h: u32) -> RgbImage {
        let mut img = self.background.render(w, h);
        if let Some(o) = self.object {
            let s = w.min(h) as f32;
            let (cx, cy) = (o.centre.0 * w as f32, o.centre.1 * h as f32);
            draw::shape(
                &mut img,
                o.shape,
                cx,
                cy,
                SIZES[o.size].1 * s,
                COLOURS[o.colour].1,
            );
        }
        img
    }
}

/// Squared distance between two colours.
pub(crate) fn dist2(a: [u8; 3], b: [u8; 3]) -> i32 {
    (0..3).map(|i| (a[i] as i32 - b[i] as i32).pow(2)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn scenes_cover_the_world_and_captions_name_it() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let scenes: Vec<Scene> = (0..2000).map(|_| Scene::random(&mut rng)).collect();
        for bg in Background::ALL {
            assert!(scenes.iter().any(|s| s.background == bg), "{bg:?}");
        }
        for (i, (name, _)) in COLOURS.iter().enumerate() {
            assert!(scenes
                .iter()
                .any(|s| s.object.is_some_and(|o| o.colour == i) && s.caption().starts_with(name)));
        }
        assert!(scenes.iter().any(|s| s.object.is_none()));
        let s = scenes.iter().find(|s| s.object.is_some()).unwrap();
        let caption = s.caption();
        assert_eq!(caption.split(", ").count(), 4, "{caption}");
    }

    #[test]
    fn orange_is_not_a_world_colour() {
        for (name, c) in COLOURS {
            assert!(
                dist2(*c, ORANGE) > 60 * 60,
                "{name} is too close to the character's orange"
            );
        }
    }
}
