//! Line charts (the loss by step).

use super::{Font, BLACK, WHITE};
use image::{Rgb, RgbImage};

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

#[cfg(test)]
mod tests {
    use super::*;

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
