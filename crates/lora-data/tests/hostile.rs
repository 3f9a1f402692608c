//! A folder with every kind of bad input, scanned to an exact report.

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use lora_data::synthetic::bomb_png;
use lora_data::{check_dataset, CheckOptions, ScanOptions};
use std::io::Cursor;
use std::path::Path;

fn img_bytes(w: u32, h: u32, seed: u8, fmt: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x as u8).wrapping_mul(seed),
            (y as u8).wrapping_add(seed),
            seed,
        ])
    });
    let mut b = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut b), fmt)
        .unwrap();
    b
}

pub fn hostile_folder(dir: &Path) {
    let w = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    };
    let good1 = img_bytes(640, 640, 1, ImageFormat::Png);
    w("good1.png", &good1);
    w("good1.txt", b"trig, 1girl, smile");
    w("good2.JPG", &img_bytes(800, 600, 2, ImageFormat::Jpeg));
    w("good2.txt", b"\xEF\xBB\xBFtrig, 1girl, outdoors\r\n");
    w("nocap.png", &img_bytes(600, 600, 3, ImageFormat::Png));
    w("orphan.txt", b"trig, lonely");
    w("emptycap.png", &img_bytes(600, 600, 4, ImageFormat::Png));
    w("emptycap.txt", b"  \r\n");
    w(
        "corrupt.png",
        b"this is not a png at all, just text pretending",
    );
    let t = img_bytes(600, 600, 5, ImageFormat::Png);
    w("truncated.png", &t[..t.len() / 2]);
    w("truncated.txt", b"trig");
    w("empty.jpg", b"");
    w("tiny.png", &img_bytes(100, 100, 6, ImageFormat::Png));
    w("tiny.txt", b"trig, small");
    w("wide.webp", &img_bytes(2000, 400, 7, ImageFormat::WebP));
    w("wide.txt", b"trig, panorama");
    w("dup.png", &good1);
    w("dup.txt", b"trig, 1girl, smile");
    w("notrig.bmp", &img_bytes(700, 700, 8, ImageFormat::Bmp));
    w("notrig.txt", b"1girl,, outdoors, ");
    w("latin1.png", &img_bytes(600, 600, 9, ImageFormat::Png));
    w("latin1.txt", b"trig, caf\xe9");
    // over the side limit, and the bomb: 1.3 GiB of 16-bit RGBA
    // pixels, under the side limit but over the 64 MP one
    w("bomb.png", &bomb_png(100_000, 100_000));
    w("bomb2.png", &bomb_png(13_376, 13_376));
    w(".hidden.png", &img_bytes(600, 600, 10, ImageFormat::Png));
    w(
        "_cache/cached.png",
        &img_bytes(600, 600, 11, ImageFormat::Png),
    );
    w("sub/inner.png", &img_bytes(600, 600, 12, ImageFormat::Png));
    w(
        "3_extra/rep.png",
        &img_bytes(768, 768, 13, ImageFormat::Png),
    );
    w("3_extra/rep.txt", b"trig, 1girl\nsecond line");
    w("notes.md", b"# not data");
}

const EXPECTED: &str = "\
warning 3_extra/rep.txt: caption has several lines; only the first is used
error   bomb.png: image is 100000×100000 (9537 megapixels), over the decoding limit (16384px per side, 64 MP): not decoded (a decompression-bomb guard); downscale the file, or raise LORAKIT_MAX_MEGAPIXELS
error   bomb2.png: image is 13376×13376 (171 megapixels), over the decoding limit (16384px per side, 64 MP): not decoded (a decompression-bomb guard); downscale the file, or raise LORAKIT_MAX_MEGAPIXELS
error   corrupt.png: not a PNG, JPEG, WebP or BMP image (unrecognised content)
warning dup.png: 640×640 is smaller than every bucket at resolution 768 (×1.20): it will be upscaled (blurry); use a larger image or a lower resolution
error   empty.jpg: the file is empty (0 bytes)
warning emptycap.png: 600×600 is smaller than every bucket at resolution 768 (×1.28): it will be upscaled (blurry); use a larger image or a lower resolution
warning emptycap.txt: caption is empty
warning emptycap.txt: trigger word `trig` missing from the caption (lorakit inserts it at train time; `lorakit caption add-trigger trig` writes it)
warning good1.png: 640×640 is smaller than every bucket at resolution 768 (×1.20): it will be upscaled (blurry); use a larger image or a lower resolution
warning good1.png: duplicate of dup.png (same bytes): it counts twice per epoch
warning good2.JPG: 800×600 is smaller than every bucket at resolution 768 (×1.12): it will be upscaled (blurry); use a larger image or a lower resolution
warning latin1.png: 600×600 is smaller than every bucket at resolution 768 (×1.28): it will be upscaled (blurry); use a larger image or a lower resolution
warning latin1.txt: caption is not valid UTF-8; decoded with replacement characters (re-save it as UTF-8)
warning nocap.png: 600×600 is smaller than every bucket at resolution 768 (×1.28): it will be upscaled (blurry); use a larger image or a lower resolution
warning nocap.png: no caption file (nocap.txt): trains with an empty caption (plus the trigger word)
warning nocap.png: trigger word `trig` missing from the caption (lorakit inserts it at train time; `lorakit caption add-trigger trig` writes it)
warning notrig.bmp: 700×700 is smaller than every bucket at resolution 768 (×1.10): it will be upscaled (blurry); use a larger image or a lower resolution
warning notrig.txt: trigger word `trig` missing from the caption (lorakit inserts it at train time; `lorakit caption add-trigger trig` writes it)
warning orphan.txt: caption without an image (orphan): ignored
warning tiny.png: 100×100 is smaller than every bucket at resolution 512 (×5.12), 768 (×7.68): it will be upscaled (blurry); use a larger image or a lower resolution
error   truncated.png: cannot decode: unexpected end of file
warning wide.webp: extreme aspect ratio 2000×400 (1:5.0): 20% of the image is cropped away

dataset:     <DIR>
images:      10 usable of 15 image files (11 caption files)
epoch:       24 samples = 12 image repeats × 2 resolution(s)
short side:  <512: 2, 512–767: 7, 768–1023: 1
buckets@512: 512x512 ×8, 576x448 ×1, 1024x256 ×1 (1 upscaled)
buckets@768: 768x768 ×8, 896x640 ×1, 1024x256 ×1 (8 upscaled)
top tags:    trig (7), 1girl (5), outdoors (2), smile (2), caf� (1), panorama (1), small (1)
result:      5 error(s), 18 warning(s): usable, but some files will be skipped
";

#[test]
fn hostile_folder_exact_report() {
    let dir = tempfile::tempdir().unwrap();
    hostile_folder(dir.path());
    let opts = CheckOptions {
        scan: ScanOptions::default(),
        trigger: Some("trig".into()),
        resolutions: vec![512, 768],
    };
    let report = check_dataset(dir.path(), &opts).unwrap();
    let text = report
        .to_string()
        .replace(&dir.path().display().to_string(), "<DIR>");
    assert_eq!(text, EXPECTED);
    assert_eq!(report.exit_code(), 1);
}
