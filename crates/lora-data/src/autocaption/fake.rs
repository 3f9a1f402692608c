//! A fake OpenAI-compatible endpoint on `127.0.0.1` for tests (feature
//! `fake-endpoint`): it records every request and answers with whatever the
//! test's handler says, after an optional delay. Tools built on lorakit can
//! use it to test their own captioning flows without a model.
//!
//! ```
//! use lora_data::autocaption::fake::{FakeEndpoint, FakeReply};
//! let server = FakeEndpoint::start(|_req, _n| FakeReply::content("1girl, solo"));
//! assert!(server.url().starts_with("http://127.0.0.1:"));
//! ```

use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A request the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The path (`/v1/chat/completions`).
    pub path: String,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl FakeRequest {
    /// The body as JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }
    /// A header's value (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The `model` field.
    pub fn model(&self) -> Option<String> {
        self.json()?["model"].as_str().map(str::to_string)
    }
    /// The text of the first message (its text part when it has parts).
    pub fn text(&self) -> Option<String> {
        let content = self.json()?["messages"][0]["content"].clone();
        match content {
            Value::String(s) => Some(s),
            Value::Array(parts) => parts
                .iter()
                .find(|p| p["type"] == "text")
                .and_then(|p| p["text"].as_str().map(str::to_string)),
            _ => None,
        }
    }
    /// The image of the first message's `image_url` part, decoded.
    pub fn image(&self) -> Option<image::RgbImage> {
        let json = self.json()?;
        let parts = json["messages"][0]["content"].as_array()?.clone();
        let url = parts
            .iter()
            .find(|p| p["type"] == "image_url")?
            .get("image_url")?["url"]
            .as_str()?
            .to_string();
        let b64 = url.split_once(";base64,")?.1;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        Some(image::load_from_memory(&bytes).ok()?.to_rgb8())
    }
}

/// What the fake answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeReply {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body, as is.
    pub body: String,
    /// Wait this long before answering.
    pub delay: Duration,
}

impl FakeReply {
    /// A chat completion whose message content is `text`.
    pub fn content(text: &str) -> Self {
        Self::raw(
            200,
            &json!({
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            })
            .to_string(),
        )
    }
    /// Any status and body.
    pub fn raw(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
    /// The same reply after `d`.
    pub fn after(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    /// The same reply with a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = dyn Fn(&FakeRequest, usize) -> FakeReply + Send + Sync;

/// A running fake endpoint; it stops when dropped.
pub struct FakeEndpoint {
    port: u16,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
    closing: Arc<AtomicBool>,
}

impl FakeEndpoint {
    /// Listens on a free port of 127.0.0.1; `handler` gets each request and
    /// how many came before it.
    pub fn start(
        handler: impl Fn(&FakeRequest, usize) -> FakeReply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let closing = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (reqs, close) = (requests.clone(), closing.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if close.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (reqs, handler) = (reqs.clone(), handler.clone());
                std::thread::spawn(move || serve(stream, &reqs, &*handler));
            }
        });
        Self {
            port,
            requests,
            closing,
        }
    }

    /// The API base to pass as `--endpoint` (`http://127.0.0.1:PORT/v1`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves one keep-alive connection until the client closes it.
fn serve(stream: TcpStream, log: &Mutex<Vec<FakeRequest>>, handler: &Handler) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut out = stream;
    while let Some(req) = read_request(&mut reader) {
        let n = {
            let mut log = log.lock().unwrap();
            log.push(req.clone());
            log.len() - 1
        };
        let reply = handler(&req, n);
        std::thread::sleep(reply.delay);
        let mut head = format!(
            "HTTP/1.1 {} Fake\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if out.write_all(head.as_bytes()).is_err() || out.write_all(reply.body.as_bytes()).is_err()
        {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<FakeRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(FakeRequest {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
