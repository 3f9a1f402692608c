//! Real-world pixel modes decode to the right RGB picture (fixtures from
//! scripts/fixtures/images.py, written by Pillow).

use lora_data::image_io::{decode_rgb, probe, DecodeLimits};
use std::path::PathBuf;

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

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (*x as i32 - y as i32).abs() <= tol)
}

#[test]
fn cmyk_jpeg_is_red() {
    let (img, info) = load("cmyk.jpg", [0; 3]);
    assert_eq!((info.width, info.height), (24, 16));
    let px = img.get_pixel(12, 8).0;
    assert!(close(px, [255, 0, 0], 12), "{px:?}");
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
    assert!(
        close(img.get_pixel(8, 3).0, [255, 255, 255], 20),
        "{:?}",
        img.get_pixel(8, 3)
    );
    assert!(
        close(img.get_pixel(8, 20).0, [0, 0, 0], 20),
        "{:?}",
        img.get_pixel(8, 20)
    );
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
