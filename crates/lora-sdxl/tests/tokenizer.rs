//! Token ids equal OpenCLIP's tokenizer on 32 prompts (fixture from
//! scripts/fixtures/tokenizer.py); chunking and padding rules.

use lora_sdxl::model::tokenizer::{BOS, EOS};
use lora_sdxl::ClipTokenizer;

#[test]
fn ids_match_reference() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer_reference.json"
    ))
    .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(rows.len() >= 30);
    let tok = ClipTokenizer::new();
    let mut bad = Vec::new();
    for r in &rows {
        let prompt = r["prompt"].as_str().unwrap();
        let want: Vec<i64> = r["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let mut got = vec![BOS];
        got.extend(tok.encode(prompt));
        got.push(EOS);
        if got != want {
            bad.push(format!("{prompt:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} prompts differ:\n{}",
        bad.len(),
        rows.len(),
        bad.join("\n")
    );
}

#[test]
fn chunks_and_padding() {
    let tok = ClipTokenizer::new();
    let c = tok.chunks("a photo of a cat", EOS);
    assert_eq!(c.len(), 1);
    assert_eq!(&c[0][..7], &[BOS, 320, 1125, 539, 320, 2368, EOS]);
    assert!(c[0][7..].iter().all(|&t| t == EOS));
    let c = tok.chunks("a photo of a cat", 0);
    assert!(c[0][7..].iter().all(|&t| t == 0));
    let empty = tok.chunks("", 0);
    assert_eq!(&empty[0][..3], &[BOS, EOS, 0]);
    let long = "word ".repeat(100);
    let c = tok.chunks(&long, 0);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0][76], EOS);
    assert_eq!(c[1][0], BOS);
    assert_eq!(c[1][26], EOS); // 25 remaining tokens
}
