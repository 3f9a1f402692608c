//! An OpenAI-compatible chat endpoint (llama.cpp's `llama-server`, vLLM,
//! Ollama, LM Studio, OpenAI): URL checks, the API key, and one chat request
//! with a timeout and retries.
//!
//! The HTTP client is `ureq`: blocking, small, rustls for https. Captioning
//! runs a few worker threads, so an async runtime would add weight and
//! nothing else.

use crate::error::{DataError, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How a request went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// This request failed (after its retries); others may still work.
    Failed(String),
    /// No request can work (a refused key, a wrong URL or model): stop the run.
    Fatal(String),
    /// The run was told to stop while waiting to retry.
    Stopped,
}

/// Timeout and retry settings of an [`Endpoint`].
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSettings {
    /// The model name sent with each request (`None`: the first one the
    /// endpoint lists under `/models`, see [`Endpoint::resolve_model`]).
    pub model: Option<String>,
    /// The longest one attempt may take, reply included.
    pub timeout: Duration,
    /// Attempts after the first on 429, 5xx, timeouts and connection errors.
    pub retries: u32,
    /// The wait before the first retry; it doubles each time (at most 30 s).
    /// A `Retry-After` header in seconds is obeyed instead (at most 60 s).
    pub backoff: Duration,
}

impl Default for EndpointSettings {
    fn default() -> Self {
        Self {
            model: None,
            timeout: Duration::from_secs(120),
            retries: 3,
            backoff: Duration::from_secs(2),
        }
    }
}

/// A checked endpoint URL plus its client.
#[derive(Clone)]
pub struct Endpoint {
    base: String,
    model: Option<String>,
    api_key: Option<String>,
    settings: EndpointSettings,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Endpoint {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("settings", &self.settings)
            .finish()
    }
}

fn invalid_url(url: &str, why: &str) -> DataError {
    DataError::Invalid(format!("--endpoint {url:?}: {why}"))
}

/// Checks an endpoint URL and returns its base (no trailing `/`, and no
/// `/chat/completions` when the user pasted the full path).
pub fn check_url(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            invalid_url(
                url,
                "must start with http:// or https:// (e.g. http://127.0.0.1:8080/v1)",
            )
        })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(invalid_url(
            url,
            "has credentials in it; put the key in an environment variable and pass --api-key-env",
        ));
    }
    if authority.is_empty() || authority.starts_with(':') {
        return Err(invalid_url(url, "has no host name"));
    }
    if url.contains(['?', '#', ' ']) {
        return Err(invalid_url(
            url,
            "must be the API base, without a query, fragment or spaces",
        ));
    }
    let base = url.trim_end_matches('/');
    let base = base.strip_suffix("/chat/completions").unwrap_or(base);
    Ok(base.trim_end_matches('/').to_string())
}

/// True for `localhost`, `127.x.x.x` and `[::1]` hosts.
fn is_loopback(base: &str) -> bool {
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or_default();
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// A failed attempt: worth a retry (after the server's `Retry-After`, if
/// it gave one) or not.
enum Attempt {
    /// The server answered with 429 or 5xx.
    Retry(String, Option<Duration>),
    /// No answer at all: a refused connection, a reset, a timeout.
    Unreachable(String),
    Give(RequestError),
}

impl Endpoint {
    /// An endpoint at `url` (see [`check_url`]). A local endpoint never goes
    /// through an HTTP proxy from the environment.
    ///
    /// ```
    /// use lora_data::autocaption::{Endpoint, EndpointSettings};
    /// let e = Endpoint::new("http://127.0.0.1:8080/v1/", EndpointSettings::default()).unwrap();
    /// assert_eq!(e.base(), "http://127.0.0.1:8080/v1");
    /// assert!(Endpoint::new("127.0.0.1:8080", EndpointSettings::default()).is_err());
    /// ```
    pub fn new(url: &str, settings: EndpointSettings) -> Result<Self> {
        let base = check_url(url)?;
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(settings.timeout))
            // A redirect is an error, never followed: the API key goes to
            // the address the user gave and nowhere else.
            .max_redirects(0)
            .user_agent(concat!("lorakit/", env!("CARGO_PKG_VERSION")));
        if is_loopback(&base) {
            config = config.proxy(None);
        }
        Ok(Self {
            base,
            model: settings.model.clone(),
            api_key: None,
            agent: config.build().new_agent(),
            settings,
        })
    }

    /// Sends `Authorization: Bearer $VAR` with every request. The key is
    /// read once, here, and never printed.
    pub fn with_api_key_env(self, var: &str) -> Result<Self> {
        let key = std::env::var(var).map_err(|_| {
            DataError::Invalid(format!(
                "--api-key-env {var}: the environment variable {var} is not set (export {var}=… first)"
            ))
        })?;
        self.with_api_key(&key).map_err(|_| {
            DataError::Invalid(format!(
                "--api-key-env {var}: the environment variable {var} is empty"
            ))
        })
    }

    /// Sends `Authorization: Bearer <key>` with every request (surrounding
    /// whitespace trimmed), to this endpoint only: redirects are not
    /// followed. The key is never printed.
    ///
    /// ```
    /// use lora_data::autocaption::{Endpoint, EndpointSettings};
    /// let e = Endpoint::new("http://127.0.0.1:8080/v1", EndpointSettings::default()).unwrap();
    /// assert!(e.with_api_key("  ").is_err());
    /// ```
    pub fn with_api_key(mut self, key: &str) -> Result<Self> {
        if key.trim().is_empty() {
            return Err(DataError::Invalid("the API key is empty".into()));
        }
        self.api_key = Some(key.trim().to_string());
        Ok(self)
    }

    /// The API base, as checked.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The model name requests carry (after [`Endpoint::resolve_model`]).
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Checks that a server answers at the base: one `GET {base}/models`
    /// without retries, any HTTP status counting as an answer. Saves a run
    /// against a server that is not up from failing image by image.
    pub fn probe(&self) -> Result<()> {
        match self.attempt(&format!("{}/models", self.base), None) {
            Err(Attempt::Unreachable(why)) => Err(DataError::Endpoint {
                url: self.base.clone(),
                reason: format!("{why}; is the server running, and is this its address?"),
            }),
            _ => Ok(()),
        }
    }

    /// Without a model name, asks `GET {base}/models` and takes the first
    /// id (llama-server and LM Studio list the loaded model there).
    pub fn resolve_model(&mut self) -> Result<String> {
        if let Some(m) = &self.model {
            return Ok(m.clone());
        }
        let fail = |why: String| DataError::Endpoint {
            url: format!("{}/models", self.base),
            reason: format!("{why}; name the model with --model"),
        };
        let body = match self.send("models", None, &AtomicBool::new(false)) {
            Ok(b) => b,
            Err(RequestError::Failed(e) | RequestError::Fatal(e)) => return Err(fail(e)),
            Err(RequestError::Stopped) => return Err(fail("stopped".into())),
        };
        let v: Value =
            serde_json::from_str(&body).map_err(|_| fail("the model list is not JSON".into()))?;
        let id = v["data"][0]["id"]
            .as_str()
            .or_else(|| v["models"][0]["name"].as_str())
            .ok_or_else(|| fail("the endpoint lists no model".into()))?;
        self.model = Some(id.to_string());
        Ok(id.to_string())
    }

    /// `POST {base}/chat/completions` with these messages; returns the
    /// reply's JSON. Retries as [`EndpointSettings`] says; `stop` cuts a
    /// wait between retries short.
    pub fn chat(
        &self,
        messages: Value,
        max_tokens: u32,
        stop: &AtomicBool,
    ) -> std::result::Result<Value, RequestError> {
        let mut body = json!({
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.2,
            "stream": false,
        });
        if let Some(m) = &self.model {
            body["model"] = json!(m);
        }
        let text = self.send("chat/completions", Some(body.to_string()), stop)?;
        serde_json::from_str(&text).map_err(|_| {
            RequestError::Failed(format!(
                "the endpoint's reply is not JSON (starts {:?})",
                text.chars().take(60).collect::<String>()
            ))
        })
    }

    /// One request with retries: GET without a body, POST with one.
    fn send(
        &self,
        path: &str,
        body: Option<String>,
        stop: &AtomicBool,
    ) -> std::result::Result<String, RequestError> {
        let url = format!("{}/{path}", self.base);
        let mut wait = self.settings.backoff;
        let mut attempt = 0;
        loop {
            let (why, after) = match self.attempt(&url, body.as_deref()) {
                Ok(text) => return Ok(text),
                Err(Attempt::Give(e)) => return Err(e),
                Err(Attempt::Retry(why, after)) => (why, after),
                Err(Attempt::Unreachable(why)) => (why, None),
            };
            if attempt >= self.settings.retries {
                let tries = if attempt == 0 {
                    String::new()
                } else {
                    format!(" (after {} attempts)", attempt + 1)
                };
                return Err(RequestError::Failed(format!("{why}{tries}")));
            }
            let delay = after.unwrap_or(wait);
            tracing::debug!(url, attempt, "retrying in {delay:?}");
            sleep_unless_stopped(delay, stop)?;
            wait = (wait * 2).min(Duration::from_secs(30));
            attempt += 1;
        }
    }

    fn attempt(&self, url: &str, body: Option<&str>) -> std::result::Result<String, Attempt> {
        let auth = self.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let result = match body {
            Some(b) => {
                let mut req = self
                    .agent
                    .post(url)
                    .header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.send(b)
            }
            None => {
                let mut req = self.agent.get(url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.call()
            }
        };
        let mut resp = result.map_err(|e| transport_error(url, e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(60)));
        let location = (resp.headers().get("location"))
            .and_then(|v| v.to_str().ok())
            .map(|l| l.chars().take(200).collect::<String>())
            .unwrap_or_default();
        let text = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| transport_error(url, e))?;
        let detail = || {
            let t: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if t.is_empty() {
                String::new()
            } else {
                format!(": {}", t.chars().take(160).collect::<String>())
            }
        };
        match status {
            200..=299 => Ok(text),
            429 => Err(Attempt::Retry(
                format!("HTTP 429 (rate limited){}", detail()),
                retry_after,
            )),
            500..=599 => Err(Attempt::Retry(format!("HTTP {status}{}", detail()), None)),
            300..=399 => Err(Attempt::Give(RequestError::Fatal(format!(
                "{url}: HTTP {status}: the endpoint redirects to {location:?}; redirects are not followed (the API key goes only to the address given): use the address it names"
            )))),
            401 | 403 => Err(Attempt::Give(RequestError::Fatal(format!(
                "{url}: HTTP {status}: the endpoint refused the request's credentials; pass the key's environment variable with --api-key-env{}",
                detail()
            )))),
            404 => Err(Attempt::Give(RequestError::Fatal(format!(
                "{url}: HTTP 404: no such API path or model; the endpoint is usually the base ending in /v1 (e.g. http://127.0.0.1:8080/v1){}",
                detail()
            )))),
            _ => Err(Attempt::Give(RequestError::Failed(format!(
                "HTTP {status}{}",
                detail()
            )))),
        }
    }
}

/// Transport errors (timeouts, refused connections, resets) are worth a retry.
fn transport_error(url: &str, e: ureq::Error) -> Attempt {
    let why = match &e {
        ureq::Error::Timeout(_) => "timed out".to_string(),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => "timed out".to_string(),
        ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
            return Attempt::Give(RequestError::Fatal(format!("{url}: {e}")))
        }
        _ => format!("cannot reach {url}: {e}"),
    };
    Attempt::Unreachable(why)
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> std::result::Result<(), RequestError> {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return Err(RequestError::Stopped);
        }
        std::thread::sleep(Duration::from_millis(20).min(until - std::time::Instant::now()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_normalised() {
        assert_eq!(
            check_url("http://127.0.0.1:8080/v1/").unwrap(),
            "http://127.0.0.1:8080/v1"
        );
        assert_eq!(
            check_url("https://api.openai.com/v1/chat/completions").unwrap(),
            "https://api.openai.com/v1"
        );
        for (bad, says) in [
            ("localhost:8080/v1", "http://"),
            ("ftp://host/v1", "http://"),
            ("http://user:sk-123@host/v1", "--api-key-env"),
            ("http:///v1", "no host"),
            ("http://host/v1?key=1", "query"),
        ] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("--endpoint"), "{bad}: {e}");
        }
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("http://127.0.0.1:8080/v1"));
        assert!(is_loopback("http://localhost/v1"));
        assert!(is_loopback("http://[::1]:11434/v1"));
        assert!(!is_loopback("https://api.openai.com/v1"));
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        std::env::set_var("LORAKIT_TEST_KEY_DEBUG", "sk-secret-123");
        let e = Endpoint::new("http://127.0.0.1:1/v1", EndpointSettings::default())
            .unwrap()
            .with_api_key_env("LORAKIT_TEST_KEY_DEBUG")
            .unwrap();
        assert!(!format!("{e:?}").contains("sk-secret"));
        let missing = Endpoint::new("http://127.0.0.1:1/v1", EndpointSettings::default())
            .unwrap()
            .with_api_key_env("LORAKIT_TEST_KEY_UNSET")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("LORAKIT_TEST_KEY_UNSET") && missing.contains("not set"));
    }
}
