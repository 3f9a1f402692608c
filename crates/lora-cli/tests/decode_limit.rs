//! `LORAKIT_MAX_MEGAPIXELS` sets the decoding limit that every image reader
//! uses (here `dataset check`); a bad value is said and ignored.

use std::process::Command;

fn check(dir: &std::path::Path, limit: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorakit"));
    cmd.args(["dataset", "check", dir.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LORAKIT_LOG")
        .env_remove("LORAKIT_MAX_MEGAPIXELS");
    if let Some(l) = limit {
        cmd.env("LORAKIT_MAX_MEGAPIXELS", l);
    }
    let o = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&o.stdout), text(&o.stderr))
}

#[test]
fn the_megapixel_limit_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 100, 50]))
        .save(dir.path().join("small.png"))
        .unwrap();
    // 9000² = 77 megapixels: over the default 64, under 128
    let big = lora_data::synthetic::bomb_png(9000, 9000);
    std::fs::write(dir.path().join("big.png"), big).unwrap();
    let over = "big.png: image is 9000×9000 (77 megapixels), over the decoding limit";

    let (out, _) = check(dir.path(), None);
    assert!(out.contains(over) && out.contains("64 MP"), "{out}");
    // raised: the header passes, and the file (a stub of pixel data) is
    // found broken by the decoder instead
    let (out, err) = check(dir.path(), Some("128"));
    assert!(!out.contains("over the decoding limit"), "{out}{err}");
    assert!(out.contains("big.png: cannot decode"), "{out}{err}");
    // a value that is not a number of megapixels is said, and the default holds
    let (out, err) = check(dir.path(), Some("lots"));
    assert!(err.contains("LORAKIT_MAX_MEGAPIXELS=\"lots\""), "{err}");
    assert!(out.contains(over), "{out}");
}
