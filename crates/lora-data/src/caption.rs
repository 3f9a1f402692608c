//! Captions: reading caption files, tag-level edits for `lorakit caption`,
//! tag statistics, and the per-step caption processing used in training.
//!
//! A caption is a comma-separated tag list (`myakumyaku-san, 1girl, smile`).
//! Tags are trimmed; empty tags (trailing or doubled commas) are dropped;
//! tags are re-joined with `", "`. Tag matching is exact after trimming and
//! case-insensitive. `(tag:1.2)` is plain text to lorakit.

use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// A caption file's text, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionText {
    /// The caption (first non-empty line, trimmed).
    pub text: String,
    /// The file was not valid UTF-8 and was decoded lossily.
    pub lossy: bool,
    /// The file had more than one non-empty line (only the first is used, as in kohya).
    pub multi_line: bool,
}

/// Decodes caption bytes: UTF-8 with or without BOM, CRLF or LF; anything
/// else lossily (flagged).
pub fn decode_caption(bytes: &[u8]) -> CaptionText {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let (s, lossy) = match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), true),
    };
    let mut lines = s.lines().map(str::trim).filter(|l| !l.is_empty());
    let text = lines.next().unwrap_or("").to_string();
    let multi_line = lines.next().is_some();
    CaptionText {
        text,
        lossy,
        multi_line,
    }
}

/// Reads and decodes a caption file.
pub fn read_caption(path: &Path) -> std::io::Result<CaptionText> {
    Ok(decode_caption(&std::fs::read(path)?))
}

/// The same-name caption file an image gets: `<stem>.<ext>` beside it
/// (`ext` without the dot).
pub fn caption_path(image: &Path, ext: &str) -> std::path::PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    image.with_file_name(format!("{stem}.{}", ext.trim_start_matches('.')))
}

/// Splits a caption into trimmed, non-empty tags.
pub fn split_tags(caption: &str) -> Vec<String> {
    caption
        .split(',')
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|t| !t.is_empty())
        .collect()
}

/// Joins tags with `", "`.
pub fn join_tags(tags: &[String]) -> String {
    tags.join(", ")
}

pub(crate) fn same_tag(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

/// True when `tag` is one of the caption's tags.
pub fn has_tag(tags: &[String], tag: &str) -> bool {
    tags.iter().any(|t| same_tag(t, tag))
}

/// `text` with every whole-word occurrence of `word` (ASCII letters compared
/// without case) replaced by `with`: a word is not part of a longer run of
/// letters, digits or `_` (the trigger `sks` in `sks, sks dog` but not in
/// `sksx`). Output preservation's class captions are made with it.
pub fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    if word.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let end = i + word.len();
        let hit = text.is_char_boundary(end)
            && text[i..end].eq_ignore_ascii_case(word)
            && !is_word(text[..i].chars().next_back())
            && !is_word(text[end..].chars().next());
        if hit {
            out.push_str(with);
            i = end;
        } else {
            let c = text[i..].chars().next().expect("i is a char boundary");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// A bulk caption edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionEdit {
    /// Prepend the trigger word when no tag equals it.
    AddTrigger(String),
    /// Remove every tag equal to one of these.
    RemoveTags(Vec<String>),
    /// Replace every tag equal to `.0` by `.1` (dropping duplicates it creates).
    ReplaceTag(String, String),
}

impl CaptionEdit {
    /// Applies the edit to a caption; other tags keep their order.
    pub fn apply(&self, caption: &str) -> String {
        let mut tags = split_tags(caption);
        match self {
            CaptionEdit::AddTrigger(w) => {
                let w = w.trim();
                if !w.is_empty() && !has_tag(&tags, w) {
                    tags.insert(0, w.to_string());
                }
            }
            CaptionEdit::RemoveTags(remove) => {
                tags.retain(|t| !remove.iter().any(|r| same_tag(t, r)))
            }
            CaptionEdit::ReplaceTag(old, new) => {
                let new = new.trim();
                let mut seen_new = false;
                tags.retain_mut(|t| {
                    if same_tag(t, old) {
                        *t = new.to_string();
                    }
                    if t.is_empty() {
                        return false;
                    }
                    if same_tag(t, new) {
                        if seen_new {
                            return false;
                        }
                        seen_new = true;
                    }
                    true
                });
            }
        }
        join_tags(&tags)
    }
}

/// Tag statistics over many captions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TagStats {
    /// Captions counted.
    pub captions: usize,
    /// Lower-cased tag → captions containing it.
    pub counts: BTreeMap<String, usize>,
}

impl TagStats {
    /// Counts each tag once per caption (lower-cased, like kohya's `ss_tag_frequency`).
    pub fn add(&mut self, caption: &str) {
        self.captions += 1;
        let mut seen = std::collections::BTreeSet::new();
        for t in split_tags(caption) {
            let t = t.to_lowercase();
            if seen.insert(t.clone()) {
                *self.counts.entry(t).or_default() += 1;
            }
        }
    }

    /// Tags by descending frequency, then name.
    pub fn sorted(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> =
            self.counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Tags in more than `fraction` of the captions (excluding `trigger`):
    /// for a character LoRA these usually describe the character and are
    /// candidates to remove so that the trigger learns them.
    pub fn removal_candidates(&self, fraction: f64, trigger: Option<&str>) -> Vec<(String, usize)> {
        self.sorted()
            .into_iter()
            .filter(|(t, n)| {
                *n as f64 > fraction * self.captions as f64
                    && !trigger.is_some_and(|tr| same_tag(t, tr))
            })
            .collect()
    }
}

/// Train-time caption processing settings (per dataset).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CaptionProcessing {
    /// Trigger word: replaces `[trigger]` and is inserted first when missing.
    pub trigger: Option<String>,
    /// Leading tags that never move or drop.
    pub keep_tokens: usize,
    /// Shuffle the tags after the kept ones.
    pub shuffle: bool,
    /// Probability that the whole caption is dropped: it becomes the trigger
    /// word alone, or empty when there is no trigger.
    pub caption_dropout_rate: f64,
    /// Probability that each non-kept tag is dropped.
    pub tag_dropout_rate: f64,
}

impl CaptionProcessing {
    /// The trigger word, trimmed (`None` when unset or blank).
    fn trigger_word(&self) -> Option<&str> {
        self.trigger
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// The caption's tags before any random step: `[trigger]` replaced and
    /// the trigger inserted first when missing.
    fn base_tags(&self, caption: &str) -> Vec<String> {
        let trigger = self.trigger_word();
        let mut tags = split_tags(&caption.replace("[trigger]", trigger.unwrap_or("")));
        if let Some(t) = trigger {
            if !has_tag(&tags, t) {
                tags.insert(0, t.to_string());
            }
        }
        tags
    }

    /// The caption as trained without dropout or shuffling (for the fixed
    /// validation set and `ss_tag_frequency`): [`Self::process`]'s first
    /// steps only.
    pub fn base(&self, caption: &str) -> String {
        join_tags(&self.base_tags(caption))
    }

    /// Processes one caption for one sample at one step. Order: caption
    /// dropout → `[trigger]` replacement → trigger insertion → shuffle of the
    /// free tags → tag dropout → join with `", "`. The trigger never moves and
    /// is never dropped.
    pub fn process<R: Rng + ?Sized>(&self, caption: &str, rng: &mut R) -> String {
        let trigger = self.trigger_word();
        if self.caption_dropout_rate > 0.0 && rng.gen::<f64>() < self.caption_dropout_rate {
            // a dropped caption keeps the trigger (as AI Toolkit does), so the
            // trigger alone learns the concept; without one it is empty
            return trigger.unwrap_or_default().to_string();
        }
        let mut tags = self.base_tags(caption);
        let keep = self.keep_tokens.min(tags.len());
        // positions after `keep` that hold something other than the trigger
        let free: Vec<usize> = (keep..tags.len())
            .filter(|&i| !trigger.is_some_and(|t| same_tag(&tags[i], t)))
            .collect();
        if self.shuffle && free.len() > 1 {
            let mut vals: Vec<String> = free.iter().map(|&i| tags[i].clone()).collect();
            vals.shuffle(rng);
            for (&i, v) in free.iter().zip(vals) {
                tags[i] = v;
            }
        }
        if self.tag_dropout_rate > 0.0 {
            let drop: std::collections::BTreeSet<usize> = free
                .iter()
                .copied()
                .filter(|_| rng.gen::<f64>() < self.tag_dropout_rate)
                .collect();
            tags = tags
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, t)| t)
                .collect();
        }
        join_tags(&tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_word_replaces_whole_words_only() {
        let r = |t: &str| replace_word(t, "sks", "dog");
        assert_eq!(r("sks, red hair, sks dog"), "dog, red hair, dog dog");
        assert_eq!(r("SKS at the beach"), "dog at the beach");
        // inside a longer word: kept
        assert_eq!(r("sksx, xsks, sks_1, 2sks"), "sksx, xsks, sks_1, 2sks");
        assert_eq!(r("(sks)"), "(dog)");
        assert_eq!(r("é sks é"), "é dog é");
        assert_eq!(replace_word("a b", "", "x"), "a b");
    }
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn decoding() {
        assert_eq!(decode_caption(b"\xEF\xBB\xBFa, b\r\n").text, "a, b");
        let c = decode_caption(b"first\r\n\r\nsecond\n");
        assert_eq!(c.text, "first");
        assert!(c.multi_line && !c.lossy);
        let c = decode_caption(b"caf\xe9, tag");
        assert!(c.lossy);
        assert!(c.text.ends_with(", tag"));
        assert_eq!(decode_caption(b"").text, "");
    }

    #[test]
    fn tricky_tags() {
        assert_eq!(split_tags("a,, b ,c,  ,"), vec!["a", "b", "c"]);
        assert_eq!(
            split_tags(" 1girl,   long  hair , (smile:1.2), 猫耳, "),
            vec!["1girl", "long hair", "(smile:1.2)", "猫耳"]
        );
        assert!(split_tags("").is_empty());
    }

    #[test]
    fn edits_keep_order_and_other_tags() {
        let add = CaptionEdit::AddTrigger("myakumyaku-san".into());
        assert_eq!(add.apply("1girl, smile,"), "myakumyaku-san, 1girl, smile");
        assert_eq!(
            add.apply("1girl, MyakuMyaku-san, smile"),
            "1girl, MyakuMyaku-san, smile"
        );
        assert_eq!(add.apply(""), "myakumyaku-san");
        let rm = CaptionEdit::RemoveTags(vec!["Blue Skin".into(), "red eyes".into()]);
        assert_eq!(
            rm.apply("trig, blue skin, smile, red  eyes, (red eyes:1.2)"),
            "trig, smile, (red eyes:1.2)"
        );
        let rep = CaptionEdit::ReplaceTag("smile".into(), "grin".into());
        assert_eq!(rep.apply("a, smile, b, grin"), "a, grin, b");
        assert_eq!(rep.apply("a, b"), "a, b");
    }

    #[test]
    fn stats_flag_character_tags() {
        let mut s = TagStats::default();
        for c in [
            "trig, blue skin, smile",
            "trig, Blue Skin, outdoors",
            "trig, blue skin, smile, blue skin",
            "trig, night",
        ] {
            s.add(c);
        }
        assert_eq!(s.counts["blue skin"], 3);
        assert_eq!(s.sorted()[0], ("trig".to_string(), 4));
        let cand = s.removal_candidates(0.5, Some("TRIG"));
        assert_eq!(cand, vec![("blue skin".to_string(), 3)]);
    }

    #[test]
    fn processing_rules() {
        let p = CaptionProcessing {
            trigger: Some("trig".into()),
            keep_tokens: 2,
            shuffle: true,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50 {
            let out = p.process("a, b, c, d, e", &mut rng);
            let tags = split_tags(&out);
            assert_eq!(tags[0], "trig"); // inserted first
            assert_eq!(tags[1], "a"); // keep_tokens = 2: the inserted trigger and `a` stay
            let mut rest = tags[2..].to_vec();
            rest.sort();
            assert_eq!(rest, vec!["b", "c", "d", "e"]);
        }
        // trigger in the middle never moves
        let p = CaptionProcessing {
            trigger: Some("trig".into()),
            shuffle: true,
            ..Default::default()
        };
        for _ in 0..20 {
            let tags = split_tags(&p.process("a, b, trig, c, d", &mut rng));
            assert_eq!(tags[2], "trig");
        }
        // [trigger] placeholder
        assert_eq!(
            CaptionProcessing {
                trigger: Some("trig".into()),
                ..Default::default()
            }
            .process("[trigger], 1girl", &mut rng),
            "trig, 1girl"
        );
        // dropout rates
        let all = CaptionProcessing {
            caption_dropout_rate: 0.999_999,
            ..Default::default()
        };
        assert_eq!(all.process("a, b", &mut rng), "");
        // with a trigger, a dropped caption is the trigger alone
        let with_trigger = CaptionProcessing {
            trigger: Some("myakumyaku-san".into()),
            ..all.clone()
        };
        assert_eq!(with_trigger.process("a, b", &mut rng), "myakumyaku-san");
        // the base caption: trigger inserted, nothing random
        assert_eq!(with_trigger.base("a, [trigger]"), "a, myakumyaku-san");
        assert_eq!(with_trigger.base("a, b"), "myakumyaku-san, a, b");
        let tags = CaptionProcessing {
            trigger: Some("t".into()),
            tag_dropout_rate: 0.999_999,
            ..Default::default()
        };
        assert_eq!(tags.process("a, b, c", &mut rng), "t");
        // same seed ⇒ same output
        let p = CaptionProcessing {
            shuffle: true,
            tag_dropout_rate: 0.3,
            ..Default::default()
        };
        let a: Vec<String> = (0..10)
            .map(|_| p.process("a, b, c, d, e, f", &mut ChaCha8Rng::seed_from_u64(9)))
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
    }
}

/// Rewrites the first non-empty line of a caption file's text, keeping the
/// other lines and the line-ending style; drops a BOM.
pub(crate) fn replace_first_line(bytes: &[u8], new_caption: &str) -> String {
    let text = decode_caption(bytes);
    let raw =
        String::from_utf8_lossy(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)).into_owned();
    let eol = if raw.contains("\r\n") { "\r\n" } else { "\n" };
    let mut lines: Vec<String> = raw.lines().map(str::to_string).collect();
    match lines
        .iter()
        .position(|l| l.trim() == text.text && !l.trim().is_empty())
    {
        Some(i) => lines[i] = new_caption.to_string(),
        None => lines = vec![new_caption.to_string()],
    }
    let mut out = lines.join(eol);
    if raw.ends_with('\n') || lines.len() > 1 {
        out.push_str(eol);
    }
    out
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn an_image_s_caption_file_uses_the_caption_extension() {
        let p = |img: &str, ext: &str| caption_path(Path::new(img), ext);
        assert_eq!(p("d/10_x/a.b.PNG", "txt"), Path::new("d/10_x/a.b.txt"));
        assert_eq!(p("a.webp", "caption"), Path::new("a.caption"));
        assert_eq!(p("a.webp", ".caption"), Path::new("a.caption"));
    }

    #[test]
    fn first_line_rewrite_keeps_the_rest() {
        assert_eq!(
            replace_first_line(b"a, b\r\nnote\r\n", "t, a, b"),
            "t, a, b\r\nnote\r\n"
        );
        assert_eq!(
            replace_first_line(b"\xEF\xBB\xBFa, b", "t, a, b"),
            "t, a, b"
        );
        assert_eq!(replace_first_line(b"", "t"), "t");
        assert_eq!(replace_first_line(b"\n\na\n", "x"), "\n\nx\n");
    }
}
