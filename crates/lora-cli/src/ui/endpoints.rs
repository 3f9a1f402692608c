//! The caption endpoints the UI may call, fixed when it starts:
//! `lorakit ui --caption-endpoint URL [--caption-key-env NAME]`, repeatable
//! (a `--caption-key-env` belongs to the `--caption-endpoint` before it),
//! then those of `ROOT/ui.toml`:
//!
//! ```toml
//! [[caption_endpoint]]
//! url = "http://127.0.0.1:8080/v1"
//! key_env = "OPENAI_API_KEY"   # optional: the variable holding its key
//! ```
//!
//! A request names one of them by id and can name nothing else: no URL, no
//! variable, no key ever comes from a request. Each key is read from the
//! environment once, at start-up; it is sent only to its endpoint (which
//! follows no redirect), and no response or log line shows it or says
//! whether some variable exists.

use clap::ArgMatches;
use lora_data::autocaption::{check_url, Endpoint, EndpointSettings};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;

/// One configured endpoint.
pub struct CaptionEndpoint {
    /// Its id in requests: its position, from 1.
    id: String,
    url: String,
    /// The variable the key came from (shown, the value never).
    key_env: Option<String>,
    key: Option<String>,
}

/// The endpoints `lorakit ui` was started with.
#[derive(Default)]
pub struct CaptionEndpoints(Vec<CaptionEndpoint>);

/// Pairs each `--caption-key-env` with the `--caption-endpoint` given
/// before it on the command line: `(url, key variable)` in the order given.
/// `ids` are the two arguments' clap ids.
pub fn pairs(
    m: &ArgMatches,
    (url_id, key_id): (&str, &str),
) -> Result<Vec<(String, Option<String>)>, String> {
    let urls: Vec<(usize, String)> = occurrences(m, url_id);
    let keys: Vec<(usize, String)> = occurrences(m, key_id);
    let mut pairs: Vec<(String, Option<String>)> =
        urls.iter().map(|(_, u)| (u.clone(), None)).collect();
    for (at, var) in keys {
        let owner = urls
            .iter()
            .rposition(|(u_at, _)| *u_at < at)
            .ok_or_else(|| {
                format!("--caption-key-env {var}: put it after the --caption-endpoint it is for")
            })?;
        if pairs[owner].1.replace(var.clone()).is_some() {
            return Err(format!(
                "--caption-key-env {var}: the endpoint {} has a key variable already",
                pairs[owner].0
            ));
        }
    }
    Ok(pairs)
}

/// `ROOT/ui.toml`: the UI's settings file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UiFile {
    #[serde(default)]
    caption_endpoint: Vec<FileEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    url: String,
    key_env: Option<String>,
}

/// The caption endpoints `(url, key variable)` of the settings file at
/// `path` (none when there is no such file); an error names the file and
/// what is wrong in it.
pub fn from_file(path: &Path) -> Result<Vec<(String, Option<String>)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file: UiFile = toml::from_str(&text).map_err(|e| {
        format!(
            "{}: {} (expected [[caption_endpoint]] tables with url and, optionally, key_env)",
            path.display(),
            e.message()
        )
    })?;
    Ok(file
        .caption_endpoint
        .into_iter()
        .map(|e| (e.url, e.key_env))
        .collect())
}

impl CaptionEndpoints {
    /// The endpoints `(url, key variable)`, their keys looked up with `env`;
    /// a URL that is not an http(s) base, or a variable that is unset or
    /// empty, is an error naming the flag.
    pub fn new(
        pairs: Vec<(String, Option<String>)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let mut list = Vec::new();
        for (i, (url, key_env)) in pairs.into_iter().enumerate() {
            let base = check_url(&url).map_err(|e| format!("--caption-endpoint {url}: {e}"))?;
            let key = match &key_env {
                Some(var) => match env(var) {
                    Some(k) if !k.trim().is_empty() => Some(k.trim().to_string()),
                    _ => {
                        return Err(format!(
                            "--caption-key-env {var}: the environment variable {var} is not set or empty (export {var}=… before lorakit ui)"
                        ))
                    }
                },
                None => None,
            };
            list.push(CaptionEndpoint {
                id: (i + 1).to_string(),
                url: base,
                key_env,
                key,
            });
        }
        Ok(Self(list))
    }

    /// What the page may know: id, URL and the key's variable name.
    pub fn public(&self) -> Value {
        let list: Vec<Value> = (self.0.iter())
            .map(|e| json!({ "id": e.id, "url": e.url, "key_env": e.key_env }))
            .collect();
        Value::Array(list)
    }

    /// The endpoint with `id`, ready to call with `settings` (its key set).
    pub fn endpoint(&self, id: &str, settings: EndpointSettings) -> Result<Endpoint, String> {
        let e = (self.0.iter().find(|e| e.id == id)).ok_or_else(|| {
            if self.0.is_empty() {
                "no caption endpoint is configured: start lorakit ui with --caption-endpoint URL [--caption-key-env NAME], or list them in ui.toml under its --root".to_string()
            } else {
                format!("endpoint: no configured endpoint has id {id:?}")
            }
        })?;
        let endpoint = Endpoint::new(&e.url, settings).map_err(|err| err.to_string())?;
        match &e.key {
            Some(k) => endpoint.with_api_key(k).map_err(|err| err.to_string()),
            None => Ok(endpoint),
        }
    }
}

/// The values of argument `id` with their positions on the command line.
fn occurrences(m: &ArgMatches, id: &str) -> Vec<(usize, String)> {
    match (m.get_many::<String>(id), m.indices_of(id)) {
        (Some(values), Some(at)) => at.zip(values.cloned()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn matches(args: &[&str]) -> ArgMatches {
        Command::new("ui")
            .arg(
                Arg::new("url")
                    .long("caption-endpoint")
                    .action(ArgAction::Append),
            )
            .arg(
                Arg::new("key")
                    .long("caption-key-env")
                    .action(ArgAction::Append),
            )
            .get_matches_from(std::iter::once("ui").chain(args.iter().copied()))
    }

    #[test]
    fn a_key_variable_belongs_to_the_endpoint_before_it() {
        let m = matches(&[
            "--caption-endpoint",
            "http://127.0.0.1:1/v1",
            "--caption-endpoint",
            "https://api.example/v1",
            "--caption-key-env",
            "LORAKIT_TEST_KEY_A",
        ]);
        let env = |v: &str| (v == "LORAKIT_TEST_KEY_A").then(|| " sk-a\n".to_string());
        let e = CaptionEndpoints::new(pairs(&m, ("url", "key")).unwrap(), env).unwrap();
        assert_eq!(
            e.public(),
            json!([
                {"id": "1", "url": "http://127.0.0.1:1/v1", "key_env": null},
                {"id": "2", "url": "https://api.example/v1", "key_env": "LORAKIT_TEST_KEY_A"},
            ])
        );
        assert_eq!(e.0[1].key.as_deref(), Some("sk-a"));
        assert_eq!(e.0[0].key, None);
        // the value never shows
        assert!(!e.public().to_string().contains("sk-a"));

        let m = matches(&[
            "--caption-key-env",
            "X",
            "--caption-endpoint",
            "http://a/v1",
        ]);
        let err = pairs(&m, ("url", "key")).err().unwrap();
        assert!(err.contains("after the --caption-endpoint"), "{err}");
        let m = matches(&[
            "--caption-endpoint",
            "http://a/v1",
            "--caption-key-env",
            "LORAKIT_TEST_KEY_A",
            "--caption-key-env",
            "LORAKIT_TEST_KEY_A",
        ]);
        let err = pairs(&m, ("url", "key")).err().unwrap();
        assert!(err.contains("has a key variable already"), "{err}");
    }

    #[test]
    fn endpoints_come_from_ui_toml_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ui.toml");
        assert_eq!(from_file(&file).unwrap(), vec![], "no file: none");
        let text = "[[caption_endpoint]]\nurl = \"http://127.0.0.1:1/v1\"\n\n[[caption_endpoint]]\nurl = \"https://api.example/v1\"\nkey_env = \"LORAKIT_TEST_KEY_B\"\n";
        std::fs::write(&file, text).unwrap();
        let pairs = from_file(&file).unwrap();
        assert_eq!(
            pairs,
            vec![
                ("http://127.0.0.1:1/v1".to_string(), None),
                (
                    "https://api.example/v1".to_string(),
                    Some("LORAKIT_TEST_KEY_B".to_string())
                ),
            ]
        );
        let env = |v: &str| (v == "LORAKIT_TEST_KEY_B").then(|| "sk-b".to_string());
        let e = CaptionEndpoints::new(pairs, env).unwrap();
        assert_eq!(e.0[1].key.as_deref(), Some("sk-b"));
        // a misspelt key is named, with the file
        std::fs::write(
            &file,
            "[[caption_endpoint]]\nurl = \"http://a/v1\"\napi_key = \"sk\"\n",
        )
        .unwrap();
        let err = from_file(&file).unwrap_err();
        assert!(err.contains("ui.toml") && err.contains("api_key"), "{err}");
    }

    #[test]
    fn unset_variables_and_bad_urls_stop_the_start() {
        let none = |_: &str| None;
        let err = CaptionEndpoints::new(vec![("http://a/v1".into(), Some("NOPE".into()))], none)
            .err()
            .unwrap();
        assert!(err.contains("--caption-key-env NOPE"), "{err}");
        let err = CaptionEndpoints::new(vec![("a:1".into(), None)], none)
            .err()
            .unwrap();
        assert!(err.starts_with("--caption-endpoint a:1"), "{err}");
        // a request can only name an id
        let e = CaptionEndpoints::new(vec![("http://a/v1".into(), None)], none).unwrap();
        assert!(e.endpoint("1", EndpointSettings::default()).is_ok());
        let err = e
            .endpoint("http://evil/v1", EndpointSettings::default())
            .err()
            .unwrap();
        assert!(err.contains("no configured endpoint"), "{err}");
        let err = CaptionEndpoints::default()
            .endpoint("1", EndpointSettings::default())
            .err()
            .unwrap();
        assert!(err.contains("--caption-endpoint URL"), "{err}");
    }
}
