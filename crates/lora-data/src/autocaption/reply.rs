//! A vision model's reply → a caption.
//!
//! Models wrap their answer in whatever they like: a `<think>` block,
//! a markdown fence, "Here are the tags:", bullets, numbering, bold, quotes,
//! Danbooru underscores, duplicates. [`clean_tags`] turns all of that into
//! the comma-separated, lower-case tag list SDXL / Illustrious captions use;
//! [`clean_natural`] into one line of prose. [`refusal`] spots "I'm sorry,
//! I can't…" so a refusal is reported as a failure instead of being written
//! as a caption.

use crate::caption::same_tag;

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
fn strip_wrappers(reply: &str) -> String {
    let mut text = reply.to_string();
    while let Some(start) = text.find("<think>") {
        match text[start..].find("</think>") {
            Some(end) => text.replace_range(start..start + end + "</think>".len(), ""),
            // An unclosed block: the answer never came.
            None => text.truncate(start),
        }
    }
    // A reply may also start with a bare `</think>` (the opening was in the prompt template).
    if let Some(end) = text.find("</think>") {
        text.replace_range(..end + "</think>".len(), "");
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

/// Strips a line's list marker (`- `, `* `, `• `, `1. `, `2) `), heading
/// hashes and emphasis markers.
fn strip_line_markup(line: &str) -> String {
    let mut l = line.trim().trim_start_matches('#').trim_start();
    for bullet in ["- ", "* ", "• ", "+ "] {
        if let Some(rest) = l.strip_prefix(bullet) {
            l = rest;
        }
    }
    let digits = l.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 {
        let rest = &l[digits..];
        if let Some(r) = rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
            l = r;
        }
    }
    l.replace("**", "").replace("__", " ").replace('`', "")
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

/// A tag-style reply → tags: every line and every comma or semicolon
/// separates tags; duplicates (case-insensitive) keep their first place.
/// `truncated` (the reply hit the token limit) drops the last tag, which may
/// be cut in half.
pub fn clean_tags(reply: &str, truncated: bool) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for line in lines(reply) {
        for part in line.split([',', ';']) {
            let tag = normalise_tag(part);
            if !tag.is_empty() && !tags.iter().any(|t| same_tag(t, &tag)) {
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
    fn prose_is_one_line() {
        assert_eq!(
            clean_natural("Caption:\n\"A red ball on a table,\nin soft light.\""),
            "A red ball on a table, in soft light."
        );
    }
}
