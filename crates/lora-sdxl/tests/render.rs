//! Comparison grids (geometry, cells, labels) and PNG text chunks.

use image::{Rgb, RgbImage};
use lora_sdxl::render::{png_text, save_png, Grid};

fn solid(w: u32, h: u32, v: u8) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb([v, 255 - v, v / 2]))
}

fn ink_in(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> usize {
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            if img.get_pixel(x, y).0.iter().all(|&c| c < 100) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn grid_geometry_cells_and_labels() {
    let rows = 2;
    let cols = 3;
    let cells: Vec<Vec<Option<RgbImage>>> = (0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| {
                    if (r, c) == (1, 2) {
                        None
                    } else {
                        Some(solid(96, 64, (r * 3 + c) as u8 * 30 + 10))
                    }
                })
                .collect()
        })
        .collect();
    let grid = Grid {
        title: "seed 42, cfg 7, euler, 25 steps, strength 0.8".into(),
        col_labels: vec!["step 100".into(), "step 200".into(), "step 300".into()],
        row_labels: vec![
            "myakumyaku-san, 1girl, beach".into(),
            "myakumyaku-san, sitting, city at night, very long prompt that wraps".into(),
        ],
        cells,
    };
    let g = grid.geometry().unwrap();
    assert_eq!((g.rows, g.cols, g.cell_w, g.cell_h), (2, 3, 96, 64));
    let img = grid.render().unwrap();
    assert_eq!(img.dimensions(), g.size());
    assert_eq!(
        img.width(),
        g.label_w + g.gap + 3 * (96 + g.gap),
        "label column + 3 cells with gaps"
    );
    assert_eq!(img.height(), g.header_h + g.gap + 2 * (64 + g.gap));
    // Every cell holds its image, pixel for pixel; the missing one is grey.
    for r in 0..2u32 {
        for c in 0..3u32 {
            let (x, y) = g.cell_origin(r, c);
            let p = img.get_pixel(x + 10, y + 10).0;
            if (r, c) == (1, 2) {
                assert_eq!(p, [200, 200, 200]);
            } else {
                let v = (r * 3 + c) as u8 * 30 + 10;
                assert_eq!(p, [v, 255 - v, v / 2], "cell ({r},{c})");
                assert_eq!(img.get_pixel(x + 95, y + 63).0, [v, 255 - v, v / 2]);
            }
        }
    }
    // Each column header and row label has text drawn in its own area.
    for c in 0..3u32 {
        let (x, _) = g.cell_origin(0, c);
        assert!(
            ink_in(&img, x, 0, x + g.cell_w, g.header_h) > 30,
            "header {c}"
        );
    }
    for r in 0..2u32 {
        let (_, y) = g.cell_origin(r, 0);
        assert!(
            ink_in(&img, 0, y, g.label_w, y + g.cell_h) > 30,
            "row label {r}"
        );
    }
    // Wrong cell counts are an error, not a panic.
    let mut bad = grid.clone();
    bad.cells.pop();
    assert!(bad
        .render()
        .unwrap_err()
        .to_string()
        .contains("2 rows × 3 columns"));
}

#[test]
fn png_text_chunks_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.png");
    let params = "myakumyaku-san, 1girl <lora:demo:0.8>\nNegative prompt: blurry\nSteps: 25, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 64x48";
    let img = solid(64, 48, 77);
    save_png(
        &path,
        &img,
        &[("parameters", params), ("software", "lorakit 0.1.0")],
    )
    .unwrap();
    let text = png_text(&path).unwrap();
    assert_eq!(
        text,
        vec![
            ("parameters".to_string(), params.to_string()),
            ("software".to_string(), "lorakit 0.1.0".to_string())
        ]
    );
    // Pixels survive; the image crate reads the file.
    assert_eq!(image::open(&path).unwrap().to_rgb8(), img);
    // Non-Latin-1 text goes to an iTXt chunk and still round-trips.
    let jp = "ミャクミャク, 1girl";
    save_png(&path, &img, &[("parameters", jp)]).unwrap();
    assert_eq!(
        png_text(&path).unwrap(),
        vec![("parameters".to_string(), jp.to_string())]
    );
    // No temp files left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
