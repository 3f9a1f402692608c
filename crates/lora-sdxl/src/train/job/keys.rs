//! Unknown keys: an error naming the key and the closest valid one (keys
//! from [`super::fields`]).

use super::fields::keys_of;
use super::JobError;
use std::path::Path;

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The valid key closest to `key` (by edit distance), if reasonably close.
pub fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (edit_distance(key, v), *v))
        .min()
        .filter(|(d, v)| *d <= (v.len().max(key.len()) / 2).max(2))
        .map(|(_, v)| v)
}

pub(super) fn check_keys(file: &Path, value: &toml::Value) -> Result<(), JobError> {
    let table = value.as_table().expect("a TOML document is a table");
    let valid_of = keys_of;
    let unknown = |field: String, key: &str, valid: &[&str]| JobError {
        file: file.to_path_buf(),
        field,
        message: match closest(key, valid) {
            Some(c) => format!("unknown key; did you mean `{c}`?"),
            None => format!("unknown key; valid keys here: {}", valid.join(", ")),
        },
    };
    for (k, v) in table {
        if !valid_of("").contains(&k.as_str()) {
            return Err(unknown(k.clone(), k, &valid_of("")));
        }
        let tables: Vec<(String, &toml::value::Table)> = match v {
            toml::Value::Table(t) => vec![(k.clone(), t)],
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .filter_map(|(i, e)| e.as_table().map(|t| (format!("{k}[{i}]"), t)))
                .collect(),
            _ => continue,
        };
        for (name, t) in tables {
            for key in t.keys() {
                if !valid_of(k).contains(&key.as_str()) {
                    return Err(unknown(format!("{name}.{key}"), key, &valid_of(k)));
                }
            }
        }
    }
    Ok(())
}
