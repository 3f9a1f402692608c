//! A vision model's reply → a caption.
//!
//! Models wrap their answer in whatever they like: a `<think>` block,
//! a markdown fence, "Here are the tags:", bullets, numbering, bold, quotes,
//! Danbooru underscores, duplicates. [`clean_tags`] turns all of that into
//! the comma-separated, lower-case tag list SDXL / Illustrious captions use;
//! [`clean_natural`] into one line of prose. [`refusal`] spots "I'm sorry,
//! I can't…" so a refusal is reported as a failure instead of being written
//! as a caption.

/// Openings of a refusal (matched case-insensitively at the start of the
/// cleaned reply).
const REFUSALS: &[&str] = &[
    "i'm sorry",
    "i am sorry",
    "sorry,",
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "as an ai",
    "unfortunately, i",
];

/// Removes reasoning blocks (`<think>…</think>`, as Qwen3 / DeepSeek-style
/// models emit) and keeps the inside of markdown code fences when there are any.
/// One pass over the reply (a hostile endpoint may send megabytes of blocks).
fn strip_wrappers(reply: &str) -> String {
    const OPEN: &str = "<think>";
    const CLOSE: &str = "</think>";
    let mut text = String::with_capacity(reply.len());
    let mut rest = reply;
    while let Some(start) = rest.find(OPEN) {
        text.push_str(&rest[..start]);
        match rest[start..].find(CLOSE) {
            Some(end) => rest = &rest[start + end + CLOSE.len()..],
            // An unclosed block: the answer never came.
            None => {
                rest = "";
                break;
            }
        }
    }
    text.push_str(rest);
    // A reply may also start with a bare `</think>` (the opening was in the prompt template).
    if let Some(end) = text.find(CLOSE) {
        text.replace_range(..end + CLOSE.len(), "");
    }
    if text.contains("```") {
        let inside: Vec<&str> = text
            .split("```")
            .skip(1)
            .step_by(2)
            .map(|block| {
                // Drop a language name on the fence's line (```text).
                match block.split_once('\n') {
                    Some((first, rest)) if !first.contains(',') => rest,
                    _ => block,
                }
            })
            .collect();
        if inside.iter().any(|b| !b.trim().is_empty()) {
            text = inside.join("\n");
        }
    }
    text
}

/// The length of a list marker at the start of `s` — a bullet (`-`, `*`,
/// `•`, `+`) or a number with `.` or `)` (`1.`, `12)`) — with the space
/// after it, or 0. `1girl`, `(smile:1.2)` and `-1` are not markers.
fn marker_len(s: &str) -> usize {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let mark = if digits > 0 {
        match s[digits..].chars().next() {
            Some(c @ ('.' | ')')) => digits + c.len_utf8(),
            _ => return 0,
        }
    } else {
        match s.chars().next() {
            Some(c @ ('-' | '*' | '•' | '+')) => c.len_utf8(),
            _ => return 0,
        }
    };
    match s[mark..].chars().next() {
        Some(c) if c.is_whitespace() => mark + c.len_utf8(),
        _ => 0,
    }
}

/// Strips a line's list marker (`- `, `* `, `• `, `1. `, `2) `), heading
/// hashes and emphasis markers.
fn strip_line_markup(line: &str) -> String {
    let mut l = line.trim().trim_start_matches('#').trim_start();
    l = &l[marker_len(l)..];
    l.replace("**", "").replace("__", " ").replace('`', "")
}

/// Splits a line of tags at commas, semicolons and list markers that start
/// a word, so a list written on one line — `1. sitting, 2. indoors`,
/// `1) sitting 2) indoors`, `• sitting • indoors`, `- sitting - indoors` —
/// gives its items without their numbers or bullets. One pass.
fn list_items(line: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut word_start) = (0, true);
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let c = rest.chars().next().unwrap_or(' ');
        if c == ',' || c == ';' {
            items.push(&line[start..i]);
            (start, word_start) = (i + 1, true);
        } else if let Some(n) = Some(marker_len(rest)).filter(|&n| word_start && n > 0) {
            items.push(&line[start..i]);
            i += n;
            (start, word_start) = (i, true);
            continue;
        } else {
            word_start = c.is_whitespace();
        }
        i += c.len_utf8();
    }
    items.push(&line[start..]);
    items
}

/// Drops a lead-in such as `Here are the tags:` or `Tags:` at the start of a
/// line: text before a colon with no comma or parenthesis and at most six
/// words. `(tag:1.2)` weights and `score_9` are left alone.
fn strip_lead_in(line: &str) -> &str {
    if let Some((head, rest)) = line.split_once(':') {
        let head_ok = !head.contains([',', '(', ')'])
            && head.split_whitespace().count() <= 6
            && head.chars().any(char::is_alphabetic);
        if head_ok {
            return rest.trim();
        }
    }
    line
}

/// The reply with wrappers and markup gone, one entry per non-empty line.
fn lines(reply: &str) -> Vec<String> {
    strip_wrappers(reply)
        .lines()
        .map(strip_line_markup)
        .map(|l| strip_lead_in(&l).to_string())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// When the reply is a refusal, its first line (for the report).
pub fn refusal(reply: &str) -> Option<String> {
    let first = lines(reply).into_iter().next().unwrap_or_default();
    let lower = first.trim().trim_matches(['"', '\'']).to_lowercase();
    REFUSALS
        .iter()
        .any(|r| lower.starts_with(r))
        .then(|| first.chars().take(120).collect())
}

/// One tag, normalised: trimmed of quotes and trailing full stops, lower
/// case, single spaces, Danbooru underscores as spaces (kept in three-character
/// emoticons such as `^_^` and `o_o`).
fn normalise_tag(tag: &str) -> String {
    let t = tag
        .trim()
        .trim_matches(['"', '\'', '“', '”', '‘', '’', '[', ']'])
        .trim_end_matches('.')
        .trim()
        .to_lowercase();
    let t = if t.chars().count() > 3 {
        t.replace('_', " ")
    } else {
        t
    };
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A tag-style reply → tags: every line, comma, semicolon and list marker
/// separates tags; duplicates (case-insensitive) keep their first place.
/// `truncated` (the reply hit the token limit) drops the last tag, which may
/// be cut in half. Linear in the reply's length.
pub fn clean_tags(reply: &str, truncated: bool) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    // normalise_tag lower-cases and trims: equal keys are `same_tag`s
    let mut seen = std::collections::HashSet::new();
    for line in lines(reply) {
        for part in list_items(&line) {
            let tag = normalise_tag(part);
            if !tag.is_empty() && seen.insert(tag.clone()) {
                tags.push(tag);
            }
        }
    }
    if truncated {
        tags.pop();
    }
    tags
}

/// A prose reply → one line: wrappers, markup and a lead-in gone, lines
/// joined with spaces, surrounding quotes removed.
pub fn clean_natural(reply: &str) -> String {
    let text = lines(reply).join(" ");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    text.trim_matches(['"', '“', '”']).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bullets_lead_in_bold_and_duplicates() {
        let reply = "Here are the tags:\n\n- 1girl\n- **solo**\n- Smile\n- smile\n* orange_body\n2. blue hat.\n";
        assert_eq!(
            clean_tags(reply, false),
            ["1girl", "solo", "smile", "orange body", "blue hat"]
        );
    }

    #[test]
    fn fences_think_blocks_and_quotes() {
        let reply = "<think>The image shows an office…</think>\n```text\n\"sitting\", indoors; office, desk_lamp\n```\nHope this helps!";
        assert_eq!(
            clean_tags(reply, false),
            ["sitting", "indoors", "office", "desk lamp"]
        );
        assert_eq!(clean_tags("</think>a, b", false), ["a", "b"]);
        assert!(clean_tags("<think>never closed", false).is_empty());
    }

    #[test]
    fn weights_emoticons_and_truncation_survive() {
        assert_eq!(
            clean_tags("score_9, (smile:1.2), ^_^, x_x", false),
            ["score 9", "(smile:1.2)", "^_^", "x_x"]
        );
        assert_eq!(clean_tags("a, b, c, d", true), ["a", "b", "c"]);
    }

    #[test]
    fn refusals_are_recognised_and_tags_are_not() {
        assert!(refusal("I'm sorry, but I can't help with that.").is_some());
        assert!(refusal("**I cannot** describe this image").is_some());
        assert!(refusal("sorry, face, 1girl").is_some());
        assert!(refusal("1girl, sorry face").is_none());
        assert!(refusal("- icon, cannot see").is_none());
    }

    #[test]
    fn lists_on_one_line_lose_their_numbers_and_bullets() {
        let want = ["sitting", "indoors", "laptop"];
        for reply in [
            "1. sitting, 2. indoors, 3. laptop",
            "1) sitting, 2) indoors, 3) laptop",
            "1. sitting 2. indoors 3. laptop",
            "1) sitting 2) indoors 3) laptop",
            "Tags: 1. sitting; 2. indoors; 3. laptop.",
            "• sitting • indoors • laptop",
            "- sitting - indoors - laptop",
            "* sitting, * indoors, * laptop",
            "1. sitting\n2. indoors\n3. laptop",
            "1) sitting\n2) indoors\n10) laptop",
            "- sitting\n- indoors, 3. laptop",
        ] {
            assert_eq!(clean_tags(reply, false), want, "{reply:?}");
        }
        // numbers that are tags, weights and hyphens inside a tag stay
        assert_eq!(
            clean_tags("1girl, 2boys, (smile:1.2), half-closed eyes, -1, 3d", false),
            [
                "1girl",
                "2boys",
                "(smile:1.2)",
                "half-closed eyes",
                "-1",
                "3d"
            ]
        );
    }

    #[test]
    fn cleaning_is_linear_in_the_reply() {
        // 16 MiB of distinct tags (the reply cap) and 16 MiB of think blocks:
        // a quadratic pass takes hours here (125 KiB of tags took 11 s, ×4
        // per doubling), a linear one well under a second in a release
        // build; the bound leaves room for a loaded debug build.
        let mut tags = String::new();
        let mut i = 0;
        while tags.len() < 16 << 20 {
            tags += &format!("tag{i}, ");
            i += 1;
        }
        let thinks = "<think>x</think>".repeat((16 << 20) / 16) + "a, b";
        // on a thread, so a quadratic mutation fails at the bound instead
        // of running for hours
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let counts = (clean_tags(&tags, false).len(), clean_tags(&thinks, false));
            let _ = tx.send(counts);
        });
        let (n, tail) = (rx.recv_timeout(std::time::Duration::from_secs(20)))
            .expect("32 MiB of replies not cleaned within 20 s");
        assert_eq!(n, i);
        assert_eq!(tail, ["a", "b"]);
    }

    #[test]
    fn prose_is_one_line() {
        assert_eq!(
            clean_natural("Caption:\n\"A red ball on a table,\nin soft light.\""),
            "A red ball on a table, in soft light."
        );
    }
}
