//! The UI's API over real HTTP on 127.0.0.1: access rules and limits
//! (`access.rs`), the Datasets API and hostile names and symlinks that must
//! not reach outside `--root` (`datasets.rs`). This file is the harness.

use super::*;
use std::io::{Read, Write};

const TOKEN: &str = "test-token-0123456789abcdef";

/// A server on a free port of 127.0.0.1, in its own runtime thread.
struct Server {
    port: u16,
    root: PathBuf,
    ui: Arc<Ui>,
    _tmp: tempfile::TempDir,
}

fn start(loopback: bool, max_upload: usize) -> Server {
    start_with(loopback, true, TOKEN, Default::default(), max_upload)
}

fn start_with(
    loopback: bool,
    auth: bool,
    token: &str,
    endpoints: endpoints::CaptionEndpoints,
    max_upload: usize,
) -> Server {
    let limits = Limits::default();
    start_limited(loopback, auth, token, endpoints, max_upload, limits)
}

/// A server whose guard has `loopback` and `auth`, with `token`, the
/// caption `endpoints` and the connection `limits`.
fn start_limited(
    loopback: bool,
    auth: bool,
    token: &str,
    endpoints: endpoints::CaptionEndpoints,
    max_upload: usize,
    limits: Limits,
) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path().join("root");
    let root = paths::Root::open(&root_dir).unwrap();
    let exe = PathBuf::from("/nonexistent/lorakit");
    let ui = Ui::new(root, token.into(), exe, endpoints);
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = std_listener.local_addr().unwrap().port();
    std_listener.set_nonblocking(true).unwrap();
    let access = security::Access {
        token: token.into(),
        loopback,
        port,
        auth,
    };
    let served = ui.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            serve(listener, router(served, access, max_upload), limits)
                .await
                .unwrap();
        });
    });
    Server {
        port,
        ui,
        root: root_dir.canonicalize().unwrap(),
        _tmp: tmp,
    }
}

/// [`raw`] with the token header added unless the request carries a token
/// header or a cookie of its own: what the page sends.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let own =
        |k: &str| k.eq_ignore_ascii_case("x-lorakit-token") || k.eq_ignore_ascii_case("cookie");
    let mut all = headers.to_vec();
    if !headers.iter().any(|(k, _)| own(k)) {
        all.push(AUTH);
    }
    raw(port, method, path, &all, body)
}

/// One raw HTTP/1.1 exchange (so the test controls every header, `Host`
/// included): returns the status, the response head and the body.
fn raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[split + 4..].to_vec();
    if head.to_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[line_end + 2..line_end + 2 + n]);
        b = &b[line_end + 4 + n..];
    }
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)))
}

const AUTH: (&str, &str) = ("X-Lorakit-Token", TOKEN);
const JSON_CT: (&str, &str) = ("Content-Type", "application/json");

/// `POST /api/datasets {name}` with the token: the status.
fn create_dataset(port: u16, name: &str) -> u16 {
    let body = serde_json::json!({ "name": name }).to_string();
    http(
        port,
        "POST",
        "/api/datasets",
        &[JSON_CT, AUTH],
        body.as_bytes(),
    )
    .0
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut v = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb([240, 120, 20]))
        .write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

mod access;
mod datasets;
mod jobs;
