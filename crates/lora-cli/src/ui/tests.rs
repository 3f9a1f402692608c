//! The UI's API over real HTTP on 127.0.0.1: access rules, the Datasets
//! API, and hostile names and symlinks that must not reach outside `--root`.

use super::*;
use std::io::{Read, Write};

const TOKEN: &str = "test-token-0123456789abcdef";

/// A server on a free port of 127.0.0.1, in its own runtime thread.
struct Server {
    port: u16,
    root: PathBuf,
    _tmp: tempfile::TempDir,
}

fn start(loopback: bool, max_upload: usize) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let root_dir = tmp.path().join("root");
    let root = paths::Root::open(&root_dir).unwrap();
    let ui = Ui::new(root, TOKEN.into(), PathBuf::from("/nonexistent/lorakit"));
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = std_listener.local_addr().unwrap().port();
    std_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            serve(listener, router(ui, loopback, max_upload))
                .await
                .unwrap();
        });
    });
    Server {
        port,
        root: root_dir.canonicalize().unwrap(),
        _tmp: tmp,
    }
}

/// One raw HTTP/1.1 exchange (so the test controls every header, `Host`
/// included): returns the status, the response head and the body.
fn http(
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

#[test]
fn changing_requests_need_the_token_header_and_the_host_must_be_local() {
    let s = start(true, 1 << 20);
    let (status, _, body) = http(s.port, "GET", "/", &[], b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(&format!("content=\"{TOKEN}\"")));
    let create = br#"{"name":"chars"}"#;
    let (status, _, _) = http(s.port, "POST", "/api/datasets", &[JSON_CT], create);
    assert_eq!(status, 403, "no token header");
    let wrong = ("X-Lorakit-Token", "test-token-0123456789abcdeX");
    assert_eq!(
        http(s.port, "POST", "/api/datasets", &[JSON_CT, wrong], create).0,
        403
    );
    let cookie = ("Cookie", "lorakit_token=test-token-0123456789abcdef");
    assert_eq!(
        http(s.port, "POST", "/api/datasets", &[JSON_CT, cookie], create).0,
        403,
        "a cookie is not enough for a change (CSRF)"
    );
    assert!(!s.root.join("datasets/chars").exists());
    assert_eq!(create_dataset(s.port, "chars"), 201);
    assert!(s.root.join("datasets/chars").is_dir());
    // DNS rebinding: a foreign Host is refused even for reads.
    let (status, _, _) = http(
        s.port,
        "GET",
        "/api/datasets",
        &[("Host", "evil.example:8675")],
        b"",
    );
    assert_eq!(status, 403);
}

#[test]
fn off_loopback_every_request_needs_the_token() {
    let s = start(false, 1 << 20);
    assert_eq!(
        http(
            s.port,
            "GET",
            "/api/datasets",
            &[("Host", "10.0.0.5:8675")],
            b""
        )
        .0,
        401
    );
    assert_eq!(
        http(s.port, "GET", "/", &[("Host", "10.0.0.5:8675")], b"").0,
        401
    );
    let (status, head, _) = http(
        s.port,
        "GET",
        &format!("/?token={TOKEN}"),
        &[("Host", "10.0.0.5")],
        b"",
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("lorakit_token=") && head.contains("HttpOnly"),
        "{head}"
    );
    let cookie = ("Cookie", "a=b; lorakit_token=test-token-0123456789abcdef");
    assert_eq!(
        http(
            s.port,
            "GET",
            "/api/datasets",
            &[("Host", "10.0.0.5"), cookie],
            b""
        )
        .0,
        200
    );
    assert_eq!(
        http(
            s.port,
            "GET",
            "/api/datasets",
            &[("Host", "10.0.0.5"), AUTH],
            b""
        )
        .0,
        200
    );
}

#[test]
fn datasets_images_and_captions_round_trip() {
    let s = start(true, 1 << 20);
    let ds = s.root.join("datasets/chars");
    assert_eq!(create_dataset(s.port, "chars"), 201);
    assert_eq!(create_dataset(s.port, "chars"), 409);
    let png = png_bytes(96, 64);
    // An upload name with a path in it lands, sanitised, in the dataset.
    let (status, _, body) = http(
        s.port,
        "PUT",
        "/api/datasets/chars/images/..%2F..%2Fa%20b.png",
        &[AUTH],
        &png,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["file"], "a_b.png");
    assert_eq!(std::fs::read(ds.join("a_b.png")).unwrap(), png);
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/chars/images/a_b.png",
            &[AUTH],
            &png
        )
        .0,
        409,
        "never replaced"
    );
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/chars/images/x.sh",
            &[AUTH],
            &png
        )
        .0,
        400
    );
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/chars/images/fake.png",
            &[AUTH],
            b"GIF89a-not"
        )
        .0,
        422
    );
    assert!(!ds.join("fake.png").exists() && !ds.join("x.sh").exists());

    let (_, _, body) = http(
        s.port,
        "GET",
        "/api/datasets/chars/images/a_b.png",
        &[],
        b"",
    );
    assert_eq!(body, png);
    let caption = br#"{"caption":" 1girl,  smile ,, beach\n"}"#;
    let (status, _, body) = http(
        s.port,
        "PUT",
        "/api/datasets/chars/captions/a_b.png",
        &[JSON_CT, AUTH],
        caption,
    );
    assert_eq!(status, 200);
    assert_eq!(json(&body)["caption"], "1girl, smile, beach");
    assert_eq!(
        std::fs::read_to_string(ds.join("a_b.txt")).unwrap(),
        "1girl, smile, beach\n"
    );

    let edit = br#"{"op":"add_trigger","word":"myakumyaku-san"}"#;
    let (_, _, body) = http(
        s.port,
        "POST",
        "/api/datasets/chars/edit?dry_run=true",
        &[JSON_CT, AUTH],
        edit,
    );
    assert_eq!(
        json(&body)["changes"][0]["after"],
        "myakumyaku-san, 1girl, smile, beach"
    );
    assert_eq!(
        std::fs::read_to_string(ds.join("a_b.txt")).unwrap(),
        "1girl, smile, beach\n"
    );
    http(
        s.port,
        "POST",
        "/api/datasets/chars/edit",
        &[JSON_CT, AUTH],
        edit,
    );
    assert_eq!(
        std::fs::read_to_string(ds.join("a_b.txt")).unwrap(),
        "myakumyaku-san, 1girl, smile, beach\n"
    );

    let (_, _, body) = http(s.port, "GET", "/api/datasets/chars", &[], b"");
    let d = json(&body);
    assert_eq!(d["images"][0]["file"], "a_b.png");
    assert_eq!(
        d["images"][0]["caption"],
        "myakumyaku-san, 1girl, smile, beach"
    );
    let (_, _, body) = http(
        s.port,
        "GET",
        "/api/datasets/chars/check?trigger=myakumyaku-san&resolution=512",
        &[],
        b"",
    );
    let c = json(&body);
    assert!(c["report"].as_str().unwrap().contains("1 image"), "{c}");
    assert!(
        c["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("upscal"),
        "{c}"
    );
    let (_, _, body) = http(s.port, "GET", "/api/datasets", &[], b"");
    assert_eq!(
        json(&body),
        serde_json::json!([{"name": "chars", "images": 1, "captioned": 1}])
    );
}

#[test]
fn nothing_outside_the_root_is_read_or_written() {
    let s = start(true, 4096);
    let outside = s.root.parent().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.png"), png_bytes(8, 8)).unwrap();
    std::fs::write(outside.join("secret.txt"), "keep").unwrap();
    let ds = s.root.join("datasets");
    std::os::unix::fs::symlink(&outside, ds.join("link")).unwrap();
    std::fs::create_dir(ds.join("real")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.png"), ds.join("real/secret.png")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), ds.join("real/cap.txt")).unwrap();
    std::fs::write(ds.join("real/cap.png"), png_bytes(8, 8)).unwrap();

    for path in [
        "/api/datasets/link",
        "/api/datasets/link/images/secret.png",
        "/api/datasets/..",
        "/api/datasets/%2e%2e/images/x.png",
        "/api/datasets/real/images/secret.png",
        "/api/datasets/real/images/..%2F..%2F..%2Foutside%2Fsecret.png",
    ] {
        let (status, _, body) = http(s.port, "GET", path, &[], b"");
        assert!((400..500).contains(&status), "{path}: {status}");
        assert_ne!(body, png_bytes(8, 8), "{path}");
    }
    let cap = br#"{"caption":"pwned"}"#;
    for path in [
        "/api/datasets/link/captions/secret.png",
        "/api/datasets/real/captions/cap.png", // cap.txt is a symlink out
        "/api/datasets/real/captions/secret.png",
    ] {
        let (status, _, _) = http(s.port, "PUT", path, &[JSON_CT, AUTH], cap);
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    assert_eq!(create_dataset(s.port, "../escape"), 400);
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/link/images/new.png",
            &[AUTH],
            &png_bytes(8, 8)
        )
        .0,
        400
    );
    // Uploads over the limit are refused before they are written.
    let big = vec![0u8; 8192];
    assert_eq!(
        http(
            s.port,
            "PUT",
            "/api/datasets/real/images/big.png",
            &[AUTH],
            &big
        )
        .0,
        413
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("secret.txt")).unwrap(),
        "keep"
    );
    let mut names: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["secret.png", "secret.txt"]);
    assert!(!s.root.parent().unwrap().join("escape").exists());
}

#[test]
fn a_dataset_is_auto_captioned_from_the_ui_with_the_key_from_the_ui_s_environment() {
    use lora_data::autocaption::fake::{FakeEndpoint, FakeReply};
    let s = start(true, 1 << 20);
    let ds = s.root.join("datasets/chars");
    std::fs::create_dir_all(&ds).unwrap();
    std::fs::write(ds.join("a.png"), png_bytes(40, 30)).unwrap();
    std::fs::write(ds.join("b.png"), png_bytes(41, 30)).unwrap();
    std::fs::write(ds.join("b.txt"), "kept\n").unwrap();
    std::env::set_var("LORAKIT_UI_TEST_KEY", "sk-ui-5150");
    let fake = FakeEndpoint::start(|req, _| match req.path.as_str() {
        "/v1/models" => FakeReply::raw(200, r#"{"data":[{"id":"vl"}]}"#),
        _ => FakeReply::content("- blue skin\n- sitting\n- office"),
    });
    let body = serde_json::json!({"endpoint": fake.url(), "api_key_env": "LORAKIT_UI_TEST_KEY",
        "trigger": "myakumyaku-san", "remove": ["blue skin"]});
    let (status, _, b) = http(
        s.port,
        "POST",
        "/api/datasets/chars/autocaption",
        &[JSON_CT, AUTH],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&b));
    let t0 = std::time::Instant::now();
    let st = loop {
        let (_, _, b) = http(s.port, "GET", "/api/datasets/chars/autocaption", &[], b"");
        let st = json(&b);
        if st["state"] == "finished" {
            break st;
        }
        assert!(t0.elapsed().as_secs() < 30, "{st}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(st["error"], serde_json::Value::Null, "{st}");
    assert_eq!(
        (st["total"].as_u64(), st["done"].as_u64()),
        (Some(2), Some(2)),
        "{st}"
    );
    assert_eq!(
        std::fs::read_to_string(ds.join("a.txt")).unwrap(),
        "myakumyaku-san, sitting, office\n"
    );
    assert_eq!(std::fs::read_to_string(ds.join("b.txt")).unwrap(), "kept\n");
    let posts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].header("authorization"), Some("Bearer sk-ui-5150"));
    assert_eq!(posts[0].model().as_deref(), Some("vl"));
    assert!(!st.to_string().contains("sk-ui-5150"));
    // Bad input is one clear error.
    let bad = serde_json::json!({"endpoint": "localhost:1234"});
    let (status, _, b) = http(
        s.port,
        "POST",
        "/api/datasets/chars/autocaption",
        &[JSON_CT, AUTH],
        bad.to_string().as_bytes(),
    );
    assert_eq!(status, 400);
    assert!(json(&b)["error"].as_str().unwrap().contains("http://"));
}
