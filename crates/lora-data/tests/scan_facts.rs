//! A second scan of an unchanged dataset reads no image: sizes and hashes
//! come from the facts file (issue 26: every view of the UI's dataset list
//! read and hashed every image).

use lora_data::{scan, ScanOptions};
use std::time::{Duration, SystemTime};

fn write_png(path: &std::path::Path, seed: u8) {
    image::RgbImage::from_fn(48, 32, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]))
        .save(path)
        .unwrap();
}

/// Overwrites `path` with garbage of the same length and gives it back
/// its mtime: a scan that reads it fails, one that trusts the stamp does not.
fn swap_bytes_keep_stamp(path: &std::path::Path) {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    std::fs::write(path, vec![b'x'; len]).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(mtime).unwrap();
}

#[test]
fn an_unchanged_dataset_is_scanned_without_reading_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for i in 0..4 {
        write_png(&data.join(format!("{i}.png")), i);
        std::fs::write(data.join(format!("{i}.txt")), "trig, a").unwrap();
    }
    let opts = ScanOptions {
        verify: false,
        facts: Some(dir.path().join("facts.json")),
        ..Default::default()
    };
    let first = scan(&data, &opts).unwrap();
    assert_eq!(first.images.len(), 4);
    assert!(dir.path().join("facts.json").is_file());

    // the bytes change behind the same size and mtime: the scan does not
    // read them, so it still sees the first scan's facts
    swap_bytes_keep_stamp(&data.join("0.png"));
    let second = scan(&data, &opts).unwrap();
    assert_eq!(second.images, first.images);
    assert!(second.problems.iter().all(|p| p.file != "0.png"));
    // without the facts file the same folder is read, and 0.png is garbage
    let fresh = scan(
        &data,
        &ScanOptions {
            facts: None,
            ..opts.clone()
        },
    )
    .unwrap();
    assert_eq!(fresh.images.len(), 3);

    // a new mtime makes it read again (and found broken)
    let f = std::fs::File::options()
        .write(true)
        .open(data.join("0.png"))
        .unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let third = scan(&data, &opts).unwrap();
    assert_eq!(third.images.len(), 3);
    assert!(
        third.problems.iter().any(|p| p.file == "0.png"),
        "{:?}",
        third.problems
    );
    // a verifying scan does not trust facts from a scan that did not decode
    write_png(&data.join("0.png"), 0);
    scan(&data, &opts).unwrap();
    swap_bytes_keep_stamp(&data.join("1.png"));
    let verified = scan(
        &data,
        &ScanOptions {
            verify: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(
        verified.problems.iter().any(|p| p.file == "1.png"),
        "{:?}",
        verified.problems
    );
}
