//! Drawing the toy world's shapes and the demo character (hard edges,
//! flat colours: what a tiny VAE can reconstruct at 64 px).

use super::{Background, Shape, HAT, ORANGE};
use image::{Rgb, RgbImage};
use rand::Rng;

/// Whether `(x, y)` lies inside the polygon `pts` (even-odd rule).
fn inside(pts: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut c = false;
    for i in 0..pts.len() {
        let (a, b) = (pts[i], pts[(i + pts.len() - 1) % pts.len()]);
        if (a.1 > y) != (b.1 > y) && x < (b.0 - a.0) * (y - a.1) / (b.1 - a.1) + a.0 {
            c = !c;
        }
    }
    c
}

/// The outline of `shape` centred at `(cx, cy)` with radius `r` (`None`
/// for the circle, which is tested by distance).
fn outline(shape: Shape, cx: f32, cy: f32, r: f32) -> Option<Vec<(f32, f32)>> {
    let polar = |n: usize, radius: &dyn Fn(usize) -> f32| -> Vec<(f32, f32)> {
        (0..n)
            .map(|i| {
                let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::TAU / n as f32;
                (cx + radius(i) * a.cos(), cy + radius(i) * a.sin())
            })
            .collect()
    };
    match shape {
        Shape::Circle => None,
        Shape::Square => {
            let h = r * 0.85;
            Some(vec![
                (cx - h, cy - h),
                (cx + h, cy - h),
                (cx + h, cy + h),
                (cx - h, cy + h),
            ])
        }
        Shape::Triangle => Some(polar(3, &|_| r * 1.1)),
        Shape::Star => Some(polar(10, &|i| if i % 2 == 0 { r * 1.15 } else { r * 0.5 })),
    }
}

/// Fills `shape` (radius `r` px, centre `(cx, cy)` px) with `colour` (any
/// RGB: the toy base's VAE is also trained on off-palette colours).
pub fn shape(img: &mut RgbImage, shape: Shape, cx: f32, cy: f32, r: f32, colour: [u8; 3]) {
    let poly = outline(shape, cx, cy, r);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let hit = match &poly {
            None => (fx - cx).powi(2) + (fy - cy).powi(2) < r * r,
            Some(p) => inside(p, fx, fy),
        };
        if hit {
            *px = Rgb(colour);
        }
    }
}

/// One drawing of the demo character: an orange round body of radius
/// `radius` (fraction of the image side) at `centre` (fractions), a blue
/// triangular hat on top and two eyes looking ahead or to the side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Character {
    pub centre: (f32, f32),
    pub radius: f32,
    pub looking_left: bool,
}

impl Character {
    /// A random pose that keeps the whole character in the picture.
    pub fn random(rng: &mut impl Rng) -> Self {
        let radius = rng.gen_range(0.17..0.27);
        let x = rng.gen_range(radius + 0.02..1.0 - radius - 0.02);
        let y = rng.gen_range(radius * 1.7 + 0.02..1.0 - radius - 0.02);
        Self {
            centre: (x, y),
            radius,
            looking_left: rng.gen_bool(0.5),
        }
    }

    /// Its size tag in the world's words.
    pub fn size_tag(&self) -> &'static str {
        if self.radius < 0.22 {
            "small"
        } else {
            "large"
        }
    }

    /// Its position tag in the world's words (nearest of [`super::POSITIONS`]).
    pub fn position_tag(&self) -> &'static str {
        super::POSITIONS
            .iter()
            .min_by(|a, b| {
                (a.1 - self.centre.0)
                    .abs()
                    .total_cmp(&(b.1 - self.centre.0).abs())
            })
            .map(|p| p.0)
            .unwrap_or("in the center")
    }
}

/// Draws the character over `background` at `w × h`.
pub fn render_character(background: Background, c: &Character, w: u32, h: u32) -> RgbImage {
    let mut img = background.render(w, h);
    let s = w.min(h) as f32;
    let (cx, cy, r) = (c.centre.0 * w as f32, c.centre.1 * h as f32, c.radius * s);
    shape(&mut img, Shape::Circle, cx, cy, r, ORANGE);
    // The hat: a triangle from 1.65 r above the centre down to 0.7 r.
    let (top, bottom) = (cy - r * 1.65, cy - r * 0.7);
    let half = (bottom - top) * 0.75;
    let hat = [(cx, top), (cx + half, bottom), (cx - half, bottom)];
    let look = if c.looking_left { -r * 0.2 } else { 0.0 };
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        if inside(&hat, fx, fy) {
            *px = Rgb(HAT);
        }
        for ex in [-r * 0.38, r * 0.38] {
            let d = ((fx - (cx + ex + look)).powi(2) + (fy - (cy - r * 0.1)).powi(2)).sqrt();
            if d < r * 0.22 {
                *px = Rgb(if d < r * 0.11 {
                    [20, 20, 20]
                } else {
                    [255, 255, 255]
                });
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_testkit::Tolerance;

    /// A shape's pixel count against its continuous area, in r² (r = 16 px):
    /// the error of sampling at pixel centres. Deterministic (pure-Rust f32,
    /// no libtorch; the same with 1 thread and AVX2-limited): circle 0.030,
    /// triangle 0.024, star 0.0025. Margin 4.8 (the bound was 0.15): a
    /// triangle of radius r instead of 1.1 r is off by 0.27 (measured).
    const RASTER: Tolerance =
        Tolerance::new(0.031, 4.8, "rasterisation at pixel centres, r = 16 px");

    #[test]
    fn shapes_fill_their_area() {
        let area = |s: Shape| {
            let mut img = RgbImage::new(64, 64);
            shape(&mut img, s, 32.0, 32.0, 16.0, [255, 0, 0]);
            img.pixels().filter(|p| p.0[0] == 255).count() as f32 / (16.0 * 16.0)
        };
        let off = |s: Shape, want: f32| f64::from((area(s) - want).abs());
        // circle π, triangle 3√3/4·1.1², star 5·1.15·0.5·sin 36°
        RASTER.check("circle vs π", off(Shape::Circle, std::f32::consts::PI));
        RASTER.check("triangle vs 1.57", off(Shape::Triangle, 1.57));
        RASTER.check("star vs 1.69", off(Shape::Star, 1.69));
        // exact: the square (4·0.85² = 2.89 continuously) is axis-aligned, its
        // sides at 18.4 and 45.6 px take exactly the 28 pixel centres between
        assert_eq!(area(Shape::Square), 28.0 * 28.0 / 256.0);
    }
}
