//! Real-world pixel modes decode to the right RGB picture (fixtures from
//! scripts/fixtures/images.py, written by Pillow).

use lora_data::image_io::{decode_rgb, probe, DecodeLimits};
use lora_testkit::Tolerance;
use std::path::PathBuf;

/// A decoded flat colour against the colour Pillow encoded, in 8-bit
/// levels: 0 measured for every pixel checked (the same with 1 thread and
/// with MKL/ATen held to AVX2, which this pure-Rust decoder does not use),
/// so the floor is a representation floor: a conforming JPEG decoder's IDCT
/// may be 1 level off per sample (ISO/IEC 10918-2), and the colour
/// transform (CMYK or YCbCr → RGB) combines such samples and rounds: 3.
/// Margin 4 (the bounds were 12 and 20): red and blue swapped, or the EXIF
/// rotation turned the wrong way, is off by 255 (measured).
const JPEG_LEVELS: Tolerance = Tolerance::new(
    3.0,
    4.0,
    "IDCT conformance (±1 level) through the colour transform",
);

fn load(name: &str, bg: [u8; 3]) -> (image::RgbImage, lora_data::image_io::ImageInfo) {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let bytes = std::fs::read(&p).unwrap();
    let l = DecodeLimits::default();
    (
        decode_rgb(&p, &bytes, &l, bg).unwrap(),
        probe(&p, &bytes, &l).unwrap(),
    )
}

/// The largest difference between two pixels' channels, in levels.
fn levels_off(a: [u8; 3], b: [u8; 3]) -> f64 {
    (a.iter().zip(b))
        .map(|(x, y)| f64::from(x.abs_diff(y)))
        .fold(0.0, f64::max)
}

#[test]
fn cmyk_jpeg_is_red() {
    let (img, info) = load("cmyk.jpg", [0; 3]);
    assert_eq!((info.width, info.height), (24, 16));
    let px = img.get_pixel(12, 8).0;
    JPEG_LEVELS.check(format!("CMYK red: {px:?}"), levels_off(px, [255, 0, 0]));
}

#[test]
fn exif_orientation_is_applied() {
    let (img, info) = load("exif_rotate90.jpg", [0; 3]);
    assert_eq!(
        (info.width, info.height),
        (16, 24),
        "probe reports the displayed size"
    );
    assert_eq!(img.dimensions(), (16, 24));
    // stored: white left half; rotated 90° clockwise: white top half
    let (top, bottom) = (img.get_pixel(8, 3).0, img.get_pixel(8, 20).0);
    JPEG_LEVELS.check(format!("top: {top:?}"), levels_off(top, [255; 3]));
    JPEG_LEVELS.check(format!("bottom: {bottom:?}"), levels_off(bottom, [0; 3]));
}

#[test]
fn sixteen_bit_gray_and_transparent_palette() {
    let (img, _) = load("gray16.png", [0; 3]);
    assert_eq!(img.get_pixel(3, 3).0, [255, 255, 255]);
    let (img, _) = load("palette.png", [0, 0, 255]);
    assert_eq!(
        img.get_pixel(1, 1).0,
        [0, 0, 255],
        "transparent → background"
    );
    assert_eq!(img.get_pixel(6, 1).0, [255, 0, 0]);
}
