//! The chat messages lorakit sends and the text it takes from a reply.

use crate::buckets::{CropBox, Placement};
use crate::error::{DataError, Result};
use crate::image_io::{decode_rgb, resize_crop, DecodeLimits};
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::Path;

/// An image file as a `data:image/jpeg;base64,…` URL: decoded as training
/// decodes it (EXIF orientation, bomb limits, alpha over white), shrunk so
/// its longer side is at most `max_side` (never enlarged), JPEG quality 90.
pub fn image_data_url(path: &Path, bytes: &[u8], max_side: u32) -> Result<String> {
    let rgb = decode_rgb(path, bytes, &DecodeLimits::default(), [255, 255, 255])?;
    let (w, h) = rgb.dimensions();
    let long = w.max(h);
    let rgb = if long > max_side {
        let scale = max_side as f64 / long as f64;
        let size = |s: u32| ((s as f64 * scale).round() as u32).max(1);
        let place = Placement {
            bucket: (size(w), size(h)),
            scale,
            crop: CropBox {
                left: 0.0,
                top: 0.0,
                width: w as f64,
                height: h as f64,
            },
            upscaled: false,
        };
        resize_crop(&rgb, &place, false)?
    } else {
        rgb
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
        .encode_image(&rgb)
        .map_err(|e| DataError::Image {
            path: path.to_path_buf(),
            reason: format!("JPEG encoding for the request failed: {e}"),
        })?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    ))
}

/// One user message with the instruction and the image.
pub fn image_messages(instruction: &str, data_url: &str) -> Value {
    json!([{
        "role": "user",
        "content": [
            {"type": "text", "text": instruction},
            {"type": "image_url", "image_url": {"url": data_url}},
        ],
    }])
}

/// One user message of text only.
pub fn text_messages(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

/// The assistant's answer in a chat completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The reply text (parts joined when the server sends a list of parts).
    pub text: String,
    /// The model stopped at the token limit (`finish_reason: "length"`).
    pub truncated: bool,
}

/// The answer of a chat completion, or why there is none (an error object,
/// no choices, OpenAI's `refusal` field, an empty reply).
pub fn answer(reply: &Value) -> std::result::Result<Answer, String> {
    if let Some(err) = reply.get("error") {
        let msg = err["message"].as_str().unwrap_or("(no message)");
        return Err(format!("the endpoint answered with an error: {msg}"));
    }
    let choice = reply["choices"]
        .get(0)
        .ok_or("the reply has no choices (is this an OpenAI-compatible /v1 endpoint?)")?;
    let message = &choice["message"];
    if let Some(r) = message["refusal"].as_str() {
        return Err(format!("the model refused: {r}"));
    }
    let text = match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    if text.trim().is_empty() {
        return Err("the model's reply is empty".into());
    }
    Ok(Answer {
        text,
        truncated: choice["finish_reason"].as_str() == Some("length"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_from_strings_parts_and_errors() {
        let a = answer(
            &json!({"choices": [{"message": {"content": "a, b"}, "finish_reason": "length"}]}),
        );
        assert_eq!(
            a,
            Ok(Answer {
                text: "a, b".into(),
                truncated: true
            })
        );
        let parts = json!({"choices": [{"message": {"content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}}]});
        assert_eq!(answer(&parts).unwrap().text, "x\ny");
        assert!(answer(&json!({"error": {"message": "model not loaded"}}))
            .unwrap_err()
            .contains("model not loaded"));
        assert!(
            answer(&json!({"choices": [{"message": {"content": null, "refusal": "no"}}]}))
                .unwrap_err()
                .contains("refused")
        );
        assert!(answer(&json!({"choices": []})).is_err());
    }

    #[test]
    fn images_shrink_to_max_side_and_never_grow() {
        let img = image::RgbImage::from_pixel(300, 200, image::Rgb([200, 30, 30]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let size = |url: String| {
            let b64 = url.strip_prefix("data:image/jpeg;base64,").unwrap();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            let d = image::load_from_memory(&bytes).unwrap();
            (d.width(), d.height())
        };
        let p = Path::new("a.png");
        assert_eq!(size(image_data_url(p, &png, 150).unwrap()), (150, 100));
        assert_eq!(size(image_data_url(p, &png, 1024).unwrap()), (300, 200));
    }
}
