//! Bitmap text: one glyph per character from `font8x8`, at an integer
//! scale, with word wrapping.

use image::{Rgb, RgbImage};

/// Glyph rows (bit 0 = leftmost pixel) of a character.
fn glyph(c: char) -> [u8; 8] {
    let code = c as u32;
    match code {
        0x20..=0x7e => font8x8::legacy::BASIC_LEGACY[code as usize],
        0xa0..=0xff => font8x8::legacy::LATIN_LEGACY[(code - 0xa0) as usize],
        _ => font8x8::legacy::BASIC_LEGACY['?' as usize],
    }
}

/// Bitmap text at an integer scale (each font pixel becomes `scale`²).
#[derive(Debug, Clone, Copy)]
pub struct Font {
    /// Pixel scale of the 8×8 font.
    pub scale: u32,
}

impl Font {
    /// Width of one character in pixels.
    pub fn char_width(&self) -> u32 {
        8 * self.scale
    }
    /// Height of one text line (glyph + spacing) in pixels.
    pub fn line_height(&self) -> u32 {
        10 * self.scale
    }
    /// Width of `text` in pixels.
    pub fn width(&self, text: &str) -> u32 {
        text.chars().count() as u32 * self.char_width()
    }
    /// Draws `text` with its top-left corner at (`x`, `y`), clipped to the image.
    pub fn draw(&self, img: &mut RgbImage, x: i64, y: i64, text: &str, color: Rgb<u8>) {
        let s = self.scale as i64;
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            let cx = x + i as i64 * 8 * s;
            for (ry, bits) in rows.iter().enumerate() {
                for rx in 0..8 {
                    if bits >> rx & 1 == 0 {
                        continue;
                    }
                    for dy in 0..s {
                        for dx in 0..s {
                            let (px, py) = (cx + rx * s + dx, y + ry as i64 * s + dy);
                            if px >= 0
                                && py >= 0
                                && (px as u32) < img.width()
                                && (py as u32) < img.height()
                            {
                                img.put_pixel(px as u32, py as u32, color);
                            }
                        }
                    }
                }
            }
        }
    }
    /// Word-wraps `text` into lines of at most `width` pixels; at most
    /// `max_lines` lines (the last ends with `…` → `...` when cut).
    pub fn wrap(&self, text: &str, width: u32, max_lines: usize) -> Vec<String> {
        let per_line = (width / self.char_width()).max(1) as usize;
        let mut lines: Vec<String> = Vec::new();
        let mut cur = String::new();
        for word in text.split_whitespace() {
            let mut word = word.to_string();
            loop {
                let len = cur.chars().count();
                let wl = word.chars().count();
                let need = if len == 0 { wl } else { len + 1 + wl };
                if need <= per_line {
                    if len > 0 {
                        cur.push(' ');
                    }
                    cur.push_str(&word);
                    break;
                }
                if len > 0 {
                    lines.push(std::mem::take(&mut cur));
                    continue;
                }
                // A word longer than a line: hard-split it.
                let head: String = word.chars().take(per_line).collect();
                word = word.chars().skip(per_line).collect();
                lines.push(head);
                if word.is_empty() {
                    break;
                }
            }
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        if lines.len() > max_lines {
            lines.truncate(max_lines.max(1));
            let last = lines.last_mut().expect("at least one line");
            let keep = per_line.saturating_sub(3).min(last.chars().count());
            *last = last.chars().take(keep).collect::<String>() + "...";
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BLACK, WHITE};
    use super::*;

    #[test]
    fn wraps_words_and_cuts_with_ellipsis() {
        let f = Font { scale: 1 };
        let lines = f.wrap("one two three four", 8 * 9, 5);
        assert_eq!(lines, vec!["one two", "three", "four"]);
        let cut = f.wrap("aaaa bbbb cccc dddd", 8 * 9, 1);
        assert_eq!(cut, vec!["aaaa b..."]);
        let long = f.wrap("abcdefghijkl", 8 * 5, 9);
        assert_eq!(long, vec!["abcde", "fghij", "kl"]);
    }

    #[test]
    fn draws_text_pixels() {
        let f = Font { scale: 2 };
        let mut img = RgbImage::from_pixel(40, 20, WHITE);
        f.draw(&mut img, 0, 0, "A", BLACK);
        let dark = img.pixels().filter(|p| p.0[0] < 128).count();
        assert!(dark > 20, "an 'A' at scale 2 has ink: {dark}");
        assert!(img.get_pixel(39, 19).0 == [255, 255, 255]);
        // Non-Latin-1 characters draw as '?', never panic.
        f.draw(&mut img, 16, 0, "魔", BLACK);
    }
}
