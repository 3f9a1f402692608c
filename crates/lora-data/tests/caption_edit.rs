//! Bulk caption edits: dry run touches nothing; real runs change only what
//! they must, atomically, keeping other tags and their order.

use image::RgbImage;
use lora_data::caption_edit::edit_captions;
use lora_data::{CaptionEdit, ScanOptions};

#[test]
fn add_remove_replace() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for n in ["a", "b", "c"] {
        RgbImage::new(64, 64)
            .save(d.join(format!("{n}.png")))
            .unwrap();
    }
    std::fs::write(d.join("a.txt"), "1girl, blue skin,, smile,").unwrap();
    std::fs::write(d.join("b.txt"), "\u{feff}trig, blue skin\r\n").unwrap();
    let opts = ScanOptions::default();

    let add = CaptionEdit::AddTrigger("trig".into());
    let dry = edit_captions(d, &opts, &add, true).unwrap();
    assert_eq!(dry.len(), 2, "{dry:?}"); // a.txt changes, c.txt would be created; b.txt already has it
    assert!(!d.join("c.txt").exists());
    assert_eq!(
        std::fs::read_to_string(d.join("a.txt")).unwrap(),
        "1girl, blue skin,, smile,"
    );

    let done = edit_captions(d, &opts, &add, false).unwrap();
    assert_eq!(done, dry);
    assert_eq!(
        std::fs::read_to_string(d.join("a.txt")).unwrap(),
        "trig, 1girl, blue skin, smile"
    );
    assert_eq!(std::fs::read_to_string(d.join("c.txt")).unwrap(), "trig");
    let b_before = std::fs::read(d.join("b.txt")).unwrap();
    assert_eq!(
        b_before,
        "\u{feff}trig, blue skin\r\n".as_bytes(),
        "unchanged file untouched"
    );

    let rm = CaptionEdit::RemoveTags(vec!["Blue Skin".into()]);
    let ch = edit_captions(d, &opts, &rm, false).unwrap();
    assert_eq!(ch.len(), 2);
    assert_eq!(
        std::fs::read_to_string(d.join("a.txt")).unwrap(),
        "trig, 1girl, smile"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("b.txt")).unwrap(),
        "trig\r\n"
    );

    let rep = CaptionEdit::ReplaceTag("smile".into(), "grin".into());
    let ch = edit_captions(d, &opts, &rep, false).unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].before, "trig, 1girl, smile");
    assert_eq!(ch[0].after, "trig, 1girl, grin");
    // no temp files left
    let n = std::fs::read_dir(d).unwrap().count();
    assert_eq!(n, 6);
}
