//! A labelled comparison grid: prompts down, steps or strengths across.

use super::{Font, BLACK, GREY, WHITE};
use crate::error::{Result, SdxlError};
use image::RgbImage;

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
            return Err(SdxlError::Picture(
                "a grid needs at least one row and one column".into(),
            ));
        }
        if self.cells.len() != rows as usize || self.cells.iter().any(|r| r.len() != cols as usize)
        {
            return Err(SdxlError::Picture(format!(
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
