//! PNG files with text chunks (A1111's `parameters`), written atomically.

use crate::error::{Result, SdxlError};
use image::RgbImage;
use std::io::Cursor;
use std::path::Path;

/// Encodes an RGB image as PNG with text chunks `(keyword, text)`: tEXt
/// when the text is Latin-1, iTXt (UTF-8) otherwise, as Pillow's PngInfo
/// does for A1111's `parameters`.
pub fn encode_png(img: &RgbImage, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let err = |e: png::EncodingError| SdxlError::Picture(format!("PNG encoding failed: {e}"));
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.to_string(), v.to_string())
                    .map_err(err)?;
            } else {
                enc.add_itxt_chunk(k.to_string(), v.to_string())
                    .map_err(err)?;
            }
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(img.as_raw()).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// Writes `img` as a PNG with text chunks, atomically (temp file + rename).
pub fn save_png(path: impl AsRef<Path>, img: &RgbImage, text: &[(&str, &str)]) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_png(img, text)?;
    Ok(lora_core::io::write_atomic(path, &bytes)?)
}

/// The text chunks (tEXt, zTXt, iTXt) of a PNG file, in file order by kind.
pub fn png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| SdxlError::io(path, e))?;
    let bad = |reason: String| SdxlError::Picture(format!("{}: {reason}", path.display()));
    let reader = png::Decoder::new(Cursor::new(bytes))
        .read_info()
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.compressed_latin1_text {
        out.push((
            c.keyword.clone(),
            c.get_text().map_err(|e| bad(e.to_string()))?,
        ));
    }
    for c in &info.utf8_text {
        out.push((
            c.keyword.clone(),
            c.get_text().map_err(|e| bad(e.to_string()))?,
        ));
    }
    Ok(out)
}
