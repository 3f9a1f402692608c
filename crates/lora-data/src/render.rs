//! Images lorakit writes for people to look at: labelled comparison grids,
//! the loss chart, and PNGs carrying generation parameters in a text chunk
//! (A1111's `parameters`), all written atomically.
//!
//! Text is drawn with the public-domain 8×8 bitmap font of `font8x8`
//! (ASCII and Latin-1; other characters show as `?`), so nothing depends on
//! fonts installed on the machine.

use crate::error::{DataError, Result};
use image::{Rgb, RgbImage};
use std::io::Cursor;
use std::path::Path;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);
const GREY: Rgb<u8> = Rgb([200, 200, 200]);

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

/// Where everything of a grid lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridGeometry {
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// Cell width (widest image).
    pub cell_w: u32,
    /// Cell height (tallest image).
    pub cell_h: u32,
    /// Width of the row-label column.
    pub label_w: u32,
    /// Height of the title + column-header band.
    pub header_h: u32,
    /// Gap between cells and around the grid.
    pub gap: u32,
}

impl GridGeometry {
    /// Top-left corner of cell (`row`, `col`).
    pub fn cell_origin(&self, row: u32, col: u32) -> (u32, u32) {
        (
            self.label_w + self.gap + col * (self.cell_w + self.gap),
            self.header_h + self.gap + row * (self.cell_h + self.gap),
        )
    }
    /// Size of the whole grid image.
    pub fn size(&self) -> (u32, u32) {
        let (x, y) = self.cell_origin(self.rows, self.cols);
        (x, y)
    }
}

/// A labelled comparison grid: `cells[row][col]`, rows labelled by
/// `row_labels` (prompts), columns by `col_labels` (steps or strengths), a
/// `title` line with the parameters every cell shares. A missing cell is
/// drawn grey.
#[derive(Debug, Clone, Default)]
pub struct Grid {
    /// One line above the headers (wrapped if long).
    pub title: String,
    /// Column headers.
    pub col_labels: Vec<String>,
    /// Row labels (wrapped into the label column).
    pub row_labels: Vec<String>,
    /// Images, `rows × cols`.
    pub cells: Vec<Vec<Option<RgbImage>>>,
}

impl Grid {
    /// The text scale used for an image of this cell size (bigger cells,
    /// bigger text).
    fn font(cell_w: u32) -> Font {
        Font {
            scale: (cell_w / 256).clamp(1, 3),
        }
    }
    /// The layout of this grid.
    pub fn geometry(&self) -> Result<GridGeometry> {
        let rows = self.row_labels.len() as u32;
        let cols = self.col_labels.len() as u32;
        if rows == 0 || cols == 0 {
            return Err(DataError::Invalid(
                "a grid needs at least one row and one column".into(),
            ));
        }
        if self.cells.len() != rows as usize || self.cells.iter().any(|r| r.len() != cols as usize)
        {
            return Err(DataError::Invalid(format!(
                "grid cells must be {rows} rows × {cols} columns"
            )));
        }
        let imgs = self.cells.iter().flatten().flatten();
        let cell_w = imgs.clone().map(|i| i.width()).max().unwrap_or(64).max(16);
        let cell_h = imgs.map(|i| i.height()).max().unwrap_or(64).max(16);
        let font = Self::font(cell_w);
        let label_w = (cell_w / 2).max(24 * font.char_width());
        let gap = 4 * font.scale;
        let title_lines = if self.title.is_empty() {
            0
        } else {
            font.wrap(&self.title, (label_w + cols * (cell_w + gap)).max(1), 3)
                .len() as u32
        };
        let header_lines = self
            .col_labels
            .iter()
            .map(|l| font.wrap(l, cell_w, 2).len() as u32)
            .max()
            .unwrap_or(1)
            .max(1);
        let header_h = gap + (title_lines + header_lines) * font.line_height();
        Ok(GridGeometry {
            rows,
            cols,
            cell_w,
            cell_h,
            label_w,
            header_h,
            gap,
        })
    }

    /// Draws the grid.
    pub fn render(&self) -> Result<RgbImage> {
        let g = self.geometry()?;
        let font = Self::font(g.cell_w);
        let (w, h) = g.size();
        let mut img = RgbImage::from_pixel(w, h, WHITE);
        let mut y = g.gap as i64;
        if !self.title.is_empty() {
            for line in font.wrap(&self.title, w - 2 * g.gap, 3) {
                font.draw(&mut img, g.gap as i64, y, &line, BLACK);
                y += font.line_height() as i64;
            }
        }
        for (c, label) in self.col_labels.iter().enumerate() {
            let (x0, _) = g.cell_origin(0, c as u32);
            for (i, line) in font.wrap(label, g.cell_w, 2).iter().enumerate() {
                let x = x0 as i64 + (g.cell_w as i64 - font.width(line) as i64).max(0) / 2;
                font.draw(
                    &mut img,
                    x,
                    y + (i as u32 * font.line_height()) as i64,
                    line,
                    BLACK,
                );
            }
        }
        let max_lines = (g.cell_h / font.line_height()).max(1) as usize;
        for (r, label) in self.row_labels.iter().enumerate() {
            let (_, y0) = g.cell_origin(r as u32, 0);
            for (i, line) in font
                .wrap(label, g.label_w - g.gap, max_lines)
                .iter()
                .enumerate()
            {
                font.draw(
                    &mut img,
                    g.gap as i64,
                    y0 as i64 + (i as u32 * font.line_height()) as i64,
                    line,
                    BLACK,
                );
            }
            for (c, cell) in self.cells[r].iter().enumerate() {
                let (x0, y0) = g.cell_origin(r as u32, c as u32);
                match cell {
                    Some(im) => image::imageops::replace(&mut img, im, x0 as i64, y0 as i64),
                    None => {
                        for y in y0..y0 + g.cell_h {
                            for x in x0..x0 + g.cell_w {
                                img.put_pixel(x, y, GREY);
                            }
                        }
                    }
                }
            }
        }
        Ok(img)
    }
}

/// One series of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Colour.
    pub color: Rgb<u8>,
    /// (x, y) points, x ascending.
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (for sparse series).
    pub dots: bool,
}

fn nice_step(range: f64, ticks: f64) -> f64 {
    let raw = (range / ticks).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    mag * if n < 1.5 {
        1.0
    } else if n < 3.5 {
        2.0
    } else if n < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// A line chart (`title`, x label, series with legend) of `width`×`height`.
/// Non-finite points are skipped.
pub fn line_chart(
    title: &str,
    x_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> RgbImage {
    let font = Font { scale: 1 };
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    let (left, right, top, bottom) = (70u32, 16u32, 34u32, 40u32);
    let pw = width.saturating_sub(left + right).max(1);
    let ph = height.saturating_sub(top + bottom).max(1);
    font.draw(&mut img, left as i64, 8, title, BLACK);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| left as f64 + (x - x0) / (x1 - x0) * pw as f64;
    let sy = |y: f64| top as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph as f64;
    // Axes, grid lines and tick labels.
    let ys = nice_step(y1 - y0, 5.0);
    let mut v = (y0 / ys).ceil() * ys;
    while v <= y1 {
        let py = sy(v).round() as u32;
        for x in left..left + pw {
            img.put_pixel(x, py.min(height - 1), Rgb([235, 235, 235]));
        }
        let t = fmt_tick(v, ys);
        font.draw(
            &mut img,
            left as i64 - 6 - font.width(&t) as i64,
            py as i64 - 4,
            &t,
            BLACK,
        );
        v += ys;
    }
    let xs = nice_step(x1 - x0, 6.0).max(1.0);
    let mut v = (x0 / xs).ceil() * xs;
    while v <= x1 {
        let px = sx(v).round() as i64;
        let t = fmt_tick(v, xs.max(1.0));
        font.draw(
            &mut img,
            px - font.width(&t) as i64 / 2,
            (top + ph + 6) as i64,
            &t,
            BLACK,
        );
        v += xs;
    }
    for x in left..left + pw {
        img.put_pixel(x, top + ph - 1, BLACK);
    }
    for y in top..top + ph {
        img.put_pixel(left, y, BLACK);
    }
    font.draw(
        &mut img,
        (left + pw / 2) as i64 - font.width(x_label) as i64 / 2,
        (top + ph + 22) as i64,
        x_label,
        BLACK,
    );
    // Series and legend.
    let mut lx = (left + pw) as i64;
    for s in series.iter().rev() {
        lx -= font.width(&s.label) as i64 + 24;
        for d in 0..12 {
            for t in 0..3 {
                put(&mut img, lx + d, 20 + t, s.color);
            }
        }
        font.draw(&mut img, lx + 16, 18, &s.label, BLACK);
    }
    for s in series {
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
        {
            let p = (sx(x), sy(y));
            if let Some(q) = prev {
                line(&mut img, q, p, s.color);
            }
            if s.dots {
                for dy in -2..=2 {
                    for dx in -2..=2 {
                        put(&mut img, p.0 as i64 + dx, p.1 as i64 + dy, s.color);
                    }
                }
            }
            prev = Some(p);
        }
    }
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as i64).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        put(img, x.round() as i64, y.round() as i64, c);
        put(img, x.round() as i64, y.round() as i64 + 1, c);
    }
}

/// Encodes an RGB image as PNG with text chunks `(keyword, text)`: tEXt
/// when the text is Latin-1, iTXt (UTF-8) otherwise, as Pillow's PngInfo
/// does for A1111's `parameters`.
pub fn encode_png(img: &RgbImage, text: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let err = |e: png::EncodingError| DataError::Invalid(format!("PNG encoding failed: {e}"));
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
    lora_core::io::write_atomic(path, &bytes).map_err(|e| DataError::Invalid(e.to_string()))
}

/// The text chunks (tEXt, zTXt, iTXt) of a PNG file, in file order by kind.
pub fn png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let bad = |reason: String| DataError::Image {
        path: path.to_path_buf(),
        reason,
    };
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn chart_handles_empty_and_flat_series() {
        let img = line_chart("loss", "step", &[], 300, 200);
        assert_eq!(img.dimensions(), (300, 200));
        let s = Series {
            label: "x".into(),
            color: Rgb([200, 0, 0]),
            points: vec![(0.0, 1.0), (1.0, 1.0), (2.0, f64::NAN)],
            dots: true,
        };
        let img = line_chart("loss", "step", &[s], 300, 200);
        assert!(img.pixels().any(|p| p.0 == [200, 0, 0]));
    }
}
