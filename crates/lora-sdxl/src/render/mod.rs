//! **Pictures** lorakit writes for people to look at: labelled comparison
//! grids ([`grid`]), the loss chart ([`chart`]), and PNGs carrying
//! generation parameters in a text chunk (A1111's `parameters`, [`png`]),
//! all written atomically. Text is drawn by [`text`].
//!
//! Text uses the public-domain 8×8 bitmap font of `font8x8` (ASCII and
//! Latin-1; other characters show as `?`), so nothing depends on fonts
//! installed on the machine.

pub mod chart;
pub mod grid;
pub mod png;
pub mod text;

pub use chart::{line_chart, Series};
pub use grid::{Grid, GridGeometry};
pub use png::{encode_png, png_text, save_png};
pub use text::Font;

use image::Rgb;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);
const GREY: Rgb<u8> = Rgb([200, 200, 200]);
