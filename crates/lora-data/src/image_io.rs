//! Image decoding with safety limits, EXIF orientation and alpha compositing,
//! and the resize + crop into a bucket.

use crate::buckets::Placement;
use crate::error::{DataError, Result};
use fast_image_resize as fr;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};
use sha2::{Digest, Sha256};
use std::io::Cursor;
use std::path::Path;

/// File extensions lorakit trains on (matched case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// True when the path has one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Guards against decompression bombs: checked on the header, before any
/// pixel is decoded, wherever lorakit reads an image (upload, `dataset
/// check`, training, captioning); the `image` crate's own allocation limit
/// stays on behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width or height accepted.
    pub max_side: u32,
    /// Largest pixel count accepted.
    pub max_pixels: u64,
}

/// The environment variable that sets [`DecodeLimits::default`]'s pixel
/// limit, in megapixels (2²⁰ pixels): `LORAKIT_MAX_MEGAPIXELS=128`.
pub const MAX_MEGAPIXELS_ENV: &str = "LORAKIT_MAX_MEGAPIXELS";

/// The default pixel limit: 64 megapixels (8192 × 8192; a 16-bit RGBA
/// image that size decodes to 512 MiB).
pub const DEFAULT_MAX_MEGAPIXELS: u64 = 64;

impl Default for DecodeLimits {
    /// 16384 px per side and [`DEFAULT_MAX_MEGAPIXELS`], or the megapixels
    /// in `LORAKIT_MAX_MEGAPIXELS` (read once; a value that is not a whole
    /// number from 1 to 4096 is ignored with a warning).
    fn default() -> Self {
        static MEGAPIXELS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let mp = *MEGAPIXELS.get_or_init(|| {
            let Ok(v) = std::env::var(MAX_MEGAPIXELS_ENV) else {
                return DEFAULT_MAX_MEGAPIXELS;
            };
            match v.trim().parse::<u64>() {
                Ok(mp) if (1..=4096).contains(&mp) => mp,
                _ => {
                    tracing::warn!(
                        "{MAX_MEGAPIXELS_ENV}={v:?}: not a whole number of megapixels from 1 to 4096; using {DEFAULT_MAX_MEGAPIXELS}"
                    );
                    DEFAULT_MAX_MEGAPIXELS
                }
            }
        });
        Self {
            max_side: 16_384,
            max_pixels: mp << 20,
        }
    }
}

impl DecodeLimits {
    /// The `image` crate's limits behind ours (which check the sides and
    /// pixels first, naming the size): room to allocate the largest accepted
    /// image at 16-bit RGBA (8 bytes a pixel), never less than the crate's
    /// default of 512 MiB.
    fn for_image_crate(&self) -> image::Limits {
        let mut l = image::Limits::default();
        let need = self.max_pixels.saturating_mul(8).saturating_add(1 << 20);
        l.max_alloc = Some(l.max_alloc.unwrap_or(0).max(need));
        l
    }
}

/// What the header says, without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Width after EXIF orientation.
    pub width: u32,
    /// Height after EXIF orientation.
    pub height: u32,
}

fn check_limits(path: &Path, w: u32, h: u32, limits: &DecodeLimits) -> Result<()> {
    let pixels = w as u64 * h as u64;
    if w > limits.max_side || h > limits.max_side || pixels > limits.max_pixels {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            reason: format!(
                "image is {w}×{h} ({:.0} megapixels), over the decoding limit ({}px per side, {} MP): not decoded (a decompression-bomb guard); downscale the file, or raise {MAX_MEGAPIXELS_ENV}",
                pixels as f64 / (1u64 << 20) as f64,
                limits.max_side,
                limits.max_pixels >> 20
            ),
        });
    }
    Ok(())
}

/// A decoder's error: the `image` crate's refusal to allocate more than it
/// allows is the decoding limit, said as such; anything else cannot decode.
fn decoding_err(path: &Path, limits: &DecodeLimits, e: image::ImageError) -> DataError {
    if !matches!(e, image::ImageError::Limits(_)) {
        return image_err(path, e);
    }
    DataError::Image {
        path: path.to_path_buf(),
        reason: format!(
            "decoding it would need more memory than the decoding limit allows ({} MP): not decoded (a decompression-bomb guard); downscale the file, or raise {MAX_MEGAPIXELS_ENV}",
            limits.max_pixels >> 20
        ),
    }
}

fn image_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Image {
        path: path.to_path_buf(),
        reason: format!("cannot decode: {e}"),
    }
}

fn decoder_for<'a>(
    path: &Path,
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<impl ImageDecoder + 'a> {
    if bytes.is_empty() {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            reason: "the file is empty (0 bytes)".into(),
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_err(path, e))?;
    if reader.format().is_none() {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            reason: "not a PNG, JPEG, WebP or BMP image (unrecognised content)".into(),
        });
    }
    reader.limits(limits.for_image_crate());
    reader
        .into_decoder()
        .map_err(|e| decoding_err(path, limits, e))
}

/// Whether the file's pixels have an alpha channel (from the header; false
/// when it cannot be read).
pub fn has_alpha(path: &Path, bytes: &[u8]) -> bool {
    decoder_for(path, bytes, &DecodeLimits::default()).is_ok_and(|d| d.color_type().has_alpha())
}

/// Reads the header: size after EXIF orientation. Enforces `limits`.
pub fn probe(path: &Path, bytes: &[u8], limits: &DecodeLimits) -> Result<ImageInfo> {
    let mut dec = decoder_for(path, bytes, limits)?;
    let (w, h) = dec.dimensions();
    check_limits(path, w, h, limits)?;
    let o = dec
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let swap = matches!(
        o,
        image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH
    );
    Ok(if swap {
        ImageInfo {
            width: h,
            height: w,
        }
    } else {
        ImageInfo {
            width: w,
            height: h,
        }
    })
}

/// Decodes to 8-bit RGB: EXIF orientation applied, alpha composited over
/// `background`, grayscale / 16-bit / CMYK converted.
pub fn decode_rgb(
    path: &Path,
    bytes: &[u8],
    limits: &DecodeLimits,
    background: [u8; 3],
) -> Result<RgbImage> {
    Ok(to_rgb(decode(path, bytes, limits)?, background))
}

/// Decodes in the file's own pixel mode, EXIF orientation applied.
pub fn decode(path: &Path, bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage> {
    let mut dec = decoder_for(path, bytes, limits)?;
    let (w, h) = dec.dimensions();
    check_limits(path, w, h, limits)?;
    let o = dec
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(dec).map_err(|e| decoding_err(path, limits, e))?;
    img.apply_orientation(o);
    Ok(img)
}

/// 8-bit RGB with alpha composited over `bg`.
pub fn to_rgb(img: DynamicImage, bg: [u8; 3]) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = src[3] as u32;
        for c in 0..3 {
            dst[c] = ((src[c] as u32 * a + bg[c] as u32 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

/// sha256 of the file bytes (hex): the identity of an image's content.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Resizes the placement's crop box of `img` to the bucket size (Lanczos3,
/// anti-aliased when shrinking), optionally mirrored. Returns packed RGB8.
pub fn resize_crop(img: &RgbImage, p: &Placement, flip: bool) -> Result<RgbImage> {
    resize_crop_any(img, fr::PixelType::U8x3, p, flip)
}

/// [`resize_crop`] of a one-channel image (a loss mask): the same crop,
/// filter and flip, so mask and image stay aligned.
pub fn resize_crop_gray(img: &GrayImage, p: &Placement, flip: bool) -> Result<GrayImage> {
    resize_crop_any(img, fr::PixelType::U8, p, flip)
}

fn resize_crop_any<P: image::Pixel<Subpixel = u8>>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    kind: fr::PixelType,
    p: &Placement,
    flip: bool,
) -> Result<image::ImageBuffer<P, Vec<u8>>> {
    let (bw, bh) = p.bucket;
    let src = fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), kind)
        .map_err(|e| DataError::Invalid(format!("resize source: {e}")))?;
    let mut dst = fr::images::Image::new(bw, bh, kind);
    let opts = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3))
        .crop(p.crop.left, p.crop.top, p.crop.width, p.crop.height);
    fr::Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| DataError::Invalid(format!("resize: {e}")))?;
    let mut out = image::ImageBuffer::from_raw(bw, bh, dst.into_vec())
        .ok_or_else(|| DataError::Invalid("resize output size".into()))?;
    if flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    Ok(out)
}

/// RGB8 (HWC) → CHW f32 in `[-1, 1]`, what the VAE encoder takes.
pub fn to_chw_f32(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buckets::place;

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut b = Vec::new();
        img.write_to(&mut Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        b
    }

    #[test]
    fn pixel_modes_become_rgb() {
        let p = Path::new("x.png");
        let l = DecodeLimits::default();
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(4, 3, image::Luma([200])));
        let rgb = decode_rgb(p, &png(gray), &l, [0, 0, 0]).unwrap();
        assert_eq!(rgb.dimensions(), (4, 3));
        assert_eq!(rgb.get_pixel(0, 0).0, [200, 200, 200]);
        let g16 = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            2,
            2,
            image::Rgb([65535u16, 0, 32768]),
        ));
        assert_eq!(
            decode_rgb(p, &png(g16), &l, [0, 0, 0])
                .unwrap()
                .get_pixel(1, 1)
                .0,
            [255, 0, 128]
        );
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            2,
            2,
            image::Rgba([255, 0, 0, 0]),
        ));
        assert_eq!(
            decode_rgb(p, &png(rgba.clone()), &l, [255, 255, 255])
                .unwrap()
                .get_pixel(0, 0)
                .0,
            [255, 255, 255]
        );
        let half = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            2,
            2,
            image::Rgba([255, 0, 0, 128]),
        ));
        assert_eq!(
            decode_rgb(p, &png(half), &l, [0, 0, 255])
                .unwrap()
                .get_pixel(0, 0)
                .0,
            [128, 0, 127]
        );
    }

    #[test]
    fn limits_and_garbage() {
        let p = Path::new("big.png");
        let img = DynamicImage::ImageRgb8(RgbImage::new(64, 32));
        let small = DecodeLimits {
            max_side: 40,
            max_pixels: 1 << 30,
        };
        let e = probe(p, &png(img), &small).unwrap_err().to_string();
        assert!(
            e.contains("big.png") && e.contains("64×32") && e.contains("decompression"),
            "{e}"
        );
        // a bomb (1.3 GiB of 16-bit RGBA behind a 100-byte header) is
        // refused on its header, by name, under the default limit
        let bomb = crate::synthetic::bomb_png(13_376, 13_376);
        let e = probe(Path::new("bomb.png"), &bomb, &DecodeLimits::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bomb.png") && e.contains("13376×13376") && e.contains("not decoded"),
            "{e}"
        );
        let e = decode(Path::new("bomb.png"), &bomb, &DecodeLimits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not decoded"), "{e}");
        // 8192 × 8192 is the default's edge: accepted by the header check
        let edge = crate::synthetic::bomb_png(8192, 8192);
        assert!(probe(Path::new("edge.png"), &edge, &DecodeLimits::default()).is_ok());
        assert!(probe(
            Path::new("over.png"),
            &crate::synthetic::bomb_png(8192, 8193),
            &DecodeLimits::default()
        )
        .is_err());
        let e = decode_rgb(p, b"", &small, [0; 3]).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = decode_rgb(p, b"hello, not an image", &small, [0; 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unrecognised"), "{e}");
    }

    #[test]
    fn resize_crop_and_flip() {
        // left half red, right half blue, 200×100 → 64×64 centre crop keeps both colours
        let mut img = RgbImage::new(200, 100);
        for (x, _, px) in img.enumerate_pixels_mut() {
            *px = if x < 100 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            };
        }
        let p = place((64, 64), 200, 100, 0.5);
        let out = resize_crop(&img, &p, false).unwrap();
        assert_eq!(out.dimensions(), (64, 64));
        assert_eq!(out.get_pixel(2, 32).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(61, 32).0, [0, 0, 255]);
        let flipped = resize_crop(&img, &p, true).unwrap();
        assert_eq!(flipped.get_pixel(2, 32).0, [0, 0, 255]);
        // crop at the left edge sees only red
        let left = resize_crop(&img, &place((64, 64), 200, 100, 0.0), false).unwrap();
        assert_eq!(left.get_pixel(55, 32).0, [255, 0, 0]);
        let chw = to_chw_f32(&out);
        assert_eq!(chw.len(), 3 * 64 * 64);
        assert_eq!(chw[32 * 64 + 2], 1.0);
        assert_eq!(chw[2 * 64 * 64 + 32 * 64 + 2], -1.0);
    }
}
