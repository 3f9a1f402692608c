//! Loss masks (kohya's masked loss): per image, a weight in `[0, 1]` for
//! every pixel — white is learned, black is ignored, grey in between — from
//! a same-name image in a mask folder (`datasets.mask_path`; its red
//! channel, as kohya reads conditioning images) or from the image's own
//! alpha channel (`datasets.alpha_mask`). A mask follows its image's crop,
//! resize and flip exactly; the trainer then area-averages it to the latent
//! grid and weights the loss with it.

use crate::buckets::Placement;
use crate::error::{DataError, Result};
use crate::image_io::{decode, probe, resize_crop_gray, to_rgb, DecodeLimits, IMAGE_EXTENSIONS};
use crate::problem::{Problem, Severity};
use image::{DynamicImage, GrayImage};
use std::path::{Path, PathBuf};

/// Where a dataset's masks come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskSource {
    /// A folder with a same-name image per training image (same relative
    /// path, any image extension).
    Folder(PathBuf),
    /// Each image's alpha channel (opaque = learned).
    Alpha,
}

/// The mask of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mask {
    /// A mask file.
    File {
        /// The mask image.
        path: PathBuf,
        /// sha256 of its bytes (part of the latent cache key).
        content_hash: String,
    },
    /// The image's alpha channel.
    Alpha,
}

impl Mask {
    /// What the mask adds to a latent cache key.
    pub fn cache_id(&self) -> String {
        match self {
            Mask::File { content_hash, .. } => content_hash.clone(),
            Mask::Alpha => "alpha".into(),
        }
    }
}

/// The mask file for the image at `rel` (relative to the dataset root):
/// `<folder>/<rel without extension>.<png|jpg|…>`.
fn find_mask_file(folder: &Path, rel: &str) -> Option<PathBuf> {
    let stem = Path::new(rel).with_extension("");
    IMAGE_EXTENSIONS
        .iter()
        .flat_map(|e| [e.to_string(), e.to_ascii_uppercase()])
        .map(|e| folder.join(&stem).with_extension(e))
        .find(|p| p.is_file())
}

/// Resolves the mask of one scanned image (`width` × `height` after EXIF
/// orientation; `has_alpha` whether the file has an alpha channel). A
/// missing, unreadable or differently sized mask file is an error (the
/// image is skipped: training it unmasked is not what was asked); an image
/// without alpha under [`MaskSource::Alpha`] is a warning (kohya trains it
/// unmasked).
pub fn resolve_mask(
    source: &MaskSource,
    rel: &str,
    (width, height): (u32, u32),
    has_alpha: bool,
    limits: &DecodeLimits,
) -> (Option<Mask>, Option<Problem>) {
    let problem = |severity, message| {
        Some(Problem {
            severity,
            file: rel.to_string(),
            message,
        })
    };
    let folder = match source {
        MaskSource::Alpha if has_alpha => return (Some(Mask::Alpha), None),
        MaskSource::Alpha => {
            return (
                Some(Mask::Alpha),
                problem(
                    Severity::Warning,
                    "alpha_mask is on but the image has no alpha channel: its whole area is learned (save it as a PNG with transparency, or give it a mask file)".into(),
                ),
            )
        }
        MaskSource::Folder(f) => f,
    };
    let Some(path) = find_mask_file(folder, rel) else {
        let want = folder.join(Path::new(rel).with_extension("png"));
        return (
            None,
            problem(
                Severity::Error,
                format!(
                    "no mask in mask_path (looked for {} or another image extension): add one (white = learn, black = ignore) or remove mask_path",
                    want.display()
                ),
            ),
        );
    };
    let checked = std::fs::read(&path)
        .map_err(|e| DataError::io(&path, e))
        .and_then(|bytes| Ok((probe(&path, &bytes, limits)?, bytes)));
    match checked {
        Err(e) => (
            None,
            problem(Severity::Error, format!("its mask cannot be used: {e}")),
        ),
        Ok((info, _)) if (info.width, info.height) != (width, height) => (
            None,
            problem(
                Severity::Error,
                format!(
                    "its mask {} is {}×{} but the image is {width}×{height}: a mask must have its image's size",
                    path.display(),
                    info.width,
                    info.height
                ),
            ),
        ),
        Ok((_, bytes)) => (
            Some(Mask::File {
                content_hash: crate::image_io::content_hash(&bytes),
                path,
            }),
            None,
        ),
    }
}

/// The full-size mask (`0` = ignored, `255` = learned): the mask file's red
/// channel, or the alpha channel of `decoded`, the image itself (already
/// decoded for its pixels, so it is not read twice).
fn decode_mask(mask: &Mask, decoded: &DynamicImage, limits: &DecodeLimits) -> Result<GrayImage> {
    Ok(match mask {
        Mask::File { path, .. } => {
            let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
            // the red channel; transparent mask pixels count as black
            let rgb = to_rgb(decode(path, &bytes, limits)?, [0, 0, 0]);
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                image::Luma([rgb.get_pixel(x, y)[0]])
            })
        }
        Mask::Alpha if decoded.color().has_alpha() => {
            let rgba = decoded.to_rgba8();
            GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                image::Luma([rgba.get_pixel(x, y)[3]])
            })
        }
        Mask::Alpha => GrayImage::from_pixel(decoded.width(), decoded.height(), image::Luma([255])),
    })
}

/// The mask of the image `path` of `(width, height)` (whose file decodes to
/// `decoded`) cropped, resized and flipped as its pixels are
/// ([`crate::image_io::resize_crop`]), as `H·W` weights in `[0, 1]`
/// (row-major, the bucket's size).
pub fn load_mask(
    (path, (width, height)): (&Path, (u32, u32)),
    mask: &Mask,
    decoded: &DynamicImage,
    (placement, flip): (&Placement, bool),
    limits: &DecodeLimits,
) -> Result<Vec<f32>> {
    let full = decode_mask(mask, decoded, limits)?;
    if full.dimensions() != (width, height) {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            reason: format!(
                "its mask is {}×{}, the image {width}×{height}: masks must have the image's size",
                full.width(),
                full.height(),
            ),
        });
    }
    let out = resize_crop_gray(&full, placement, flip)?;
    Ok(out.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buckets::{CropBox, Placement};

    fn write_png(path: &Path, img: image::DynamicImage) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }

    fn whole(w: u32, h: u32) -> Placement {
        crate::buckets::place((w, h), w, h, 0.5)
    }

    #[test]
    fn a_mask_follows_the_crop_and_the_flip() {
        let dir = tempfile::tempdir().unwrap();
        // left third white, the rest black, 96×32
        let m = GrayImage::from_fn(96, 32, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
        let mpath = dir.path().join("masks/a.png");
        write_png(&mpath, image::DynamicImage::ImageLuma8(m));
        let a = dir.path().join("a.png");
        let img = (a.as_path(), (96, 32));
        let mask = Mask::File {
            path: mpath,
            content_hash: String::new(),
        };
        let limits = DecodeLimits::default();
        let at = |v: &[f32], x: usize| v[16 * 96 + x];
        let pixels = image::DynamicImage::ImageRgb8(image::RgbImage::new(96, 32));
        let plain = load_mask(img, &mask, &pixels, (&whole(96, 32), false), &limits).unwrap();
        assert_eq!((at(&plain, 5), at(&plain, 90)), (1.0, 0.0));
        let flipped = load_mask(img, &mask, &pixels, (&whole(96, 32), true), &limits).unwrap();
        assert_eq!((at(&flipped, 5), at(&flipped, 90)), (0.0, 1.0));
        // a 32×32 crop of the right two thirds: all black
        let crop = Placement {
            bucket: (32, 32),
            crop: CropBox {
                left: 48.0,
                top: 0.0,
                width: 32.0,
                height: 32.0,
            },
            scale: 1.0,
            upscaled: false,
        };
        let cropped = load_mask(img, &mask, &pixels, (&crop, false), &limits).unwrap();
        assert!(cropped.iter().all(|&v| v == 0.0), "{:?}", &cropped[..8]);
    }

    #[test]
    fn alpha_masks_and_images_without_alpha() {
        let dir = tempfile::tempdir().unwrap();
        let rgba = image::RgbaImage::from_fn(16, 16, |x, _| {
            image::Rgba([200, 10, 10, if x < 8 { 255 } else { 0 }])
        });
        let p = dir.path().join("a.png");
        let decoded = image::DynamicImage::ImageRgba8(rgba);
        write_png(&p, decoded.clone());
        let limits = DecodeLimits::default();
        let at = (&whole(16, 16), false);
        let m = load_mask((&p, (16, 16)), &Mask::Alpha, &decoded, at, &limits).unwrap();
        assert_eq!((m[8 * 16 + 2], m[8 * 16 + 13]), (1.0, 0.0));
        let q = dir.path().join("b.png");
        let opaque = image::DynamicImage::ImageRgb8(image::RgbImage::new(16, 16));
        write_png(&q, opaque.clone());
        let ones = load_mask((&q, (16, 16)), &Mask::Alpha, &opaque, at, &limits).unwrap();
        assert!(ones.iter().all(|&v| v == 1.0));
        let (mask, problem) = resolve_mask(&MaskSource::Alpha, "b.png", (16, 16), false, &limits);
        assert_eq!(mask, Some(Mask::Alpha));
        assert_eq!(problem.unwrap().severity, Severity::Warning);
    }

    #[test]
    fn missing_and_mis_sized_mask_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("masks");
        write_png(
            &folder.join("sub/b.jpg"),
            image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8)),
        );
        let limits = DecodeLimits::default();
        let src = MaskSource::Folder(folder.clone());
        let (m, p) = resolve_mask(&src, "a.png", (8, 8), false, &limits);
        let p = p.unwrap();
        assert!(m.is_none() && p.severity == Severity::Error, "{p:?}");
        assert!(p.message.contains("masks/a.png"), "{}", p.message);
        let (m, p) = resolve_mask(&src, "sub/b.png", (16, 8), false, &limits);
        let p = p.unwrap();
        assert!(
            m.is_none() && p.message.contains("8×8 but the image is 16×8"),
            "{}",
            p.message
        );
        let (m, p) = resolve_mask(&src, "sub/b.png", (8, 8), false, &limits);
        assert!(p.is_none());
        assert!(matches!(m, Some(Mask::File { path, .. }) if path.ends_with("sub/b.jpg")));
    }
}
