//! Who may call the UI, and how many at once.

use super::*;
use std::io::Read;

/// The `Set-Cookie` line of a response head, lower-cased name.
fn set_cookie(head: &str) -> Option<&str> {
    head.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
}

fn cookie_for(port: u16, token: &str) -> String {
    format!("a=b; lorakit_token_{port}={token}")
}

#[test]
fn without_the_token_a_local_process_gets_only_the_sign_in_page() {
    let s = start(true, 1 << 20);
    // `curl -s 127.0.0.1:PORT/`: no token in it, the page says what to do
    let (status, _, body) = raw(s.port, "GET", "/", &[], b"");
    assert_eq!(status, 401);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("Open the link"), "{body}");
    assert!(!body.contains(TOKEN), "{body}");
    for path in [
        "/api/datasets",
        "/api/jobs",
        "/app.js",
        "/api/caption-endpoints",
    ] {
        assert_eq!(raw(s.port, "GET", path, &[], b"").0, 401, "{path}");
    }
    let wrong = ("X-Lorakit-Token", "test-token-0123456789abcdeX");
    assert_eq!(raw(s.port, "GET", "/api/datasets", &[wrong], b"").0, 401);
    // the old cookie name, and another port's cookie, are not this UI's
    for cookie in [format!("lorakit_token={TOKEN}"), cookie_for(1, TOKEN)] {
        let h = [("Cookie", cookie.as_str())];
        assert_eq!(raw(s.port, "GET", "/api/datasets", &h, b"").0, 401);
    }
    // the printed link: the token becomes this port's cookie and leaves the address
    let (status, head, _) = raw(s.port, "GET", &format!("/?token={TOKEN}&x=1"), &[], b"");
    assert_eq!(status, 303, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nlocation: /?x=1"),
        "{head}"
    );
    let c = set_cookie(&head).unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        c.contains(&format!("lorakit_token_{}={TOKEN}", s.port)),
        "{c}"
    );
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Strict"),
        "{c}"
    );
    // with the cookie, or with the header: the page and the API
    let cookie = cookie_for(s.port, TOKEN);
    let (status, _, body) = raw(s.port, "GET", "/", &[("Cookie", &cookie)], b"");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(&format!("content=\"{TOKEN}\"")));
    let h = [("Cookie", cookie.as_str())];
    assert_eq!(raw(s.port, "GET", "/api/datasets", &h, b"").0, 200);
    assert_eq!(raw(s.port, "GET", "/api/datasets", &[AUTH], b"").0, 200);
}

#[test]
fn changing_requests_need_the_token_header_and_the_host_must_be_local() {
    let s = start(true, 1 << 20);
    let create = br#"{"name":"chars"}"#;
    let (status, _, _) = raw(s.port, "POST", "/api/datasets", &[JSON_CT], create);
    assert_eq!(status, 403, "no token header");
    let wrong = ("X-Lorakit-Token", "test-token-0123456789abcdeX");
    assert_eq!(
        raw(s.port, "POST", "/api/datasets", &[JSON_CT, wrong], create).0,
        403
    );
    let cookie = cookie_for(s.port, TOKEN);
    assert_eq!(
        raw(
            s.port,
            "POST",
            "/api/datasets",
            &[JSON_CT, ("Cookie", &cookie)],
            create
        )
        .0,
        403,
        "a cookie is not enough for a change (CSRF)"
    );
    assert!(!s.root.join("datasets/chars").exists());
    assert_eq!(create_dataset(s.port, "chars"), 201);
    assert!(s.root.join("datasets/chars").is_dir());
    // DNS rebinding: a foreign Host is refused even with the token.
    let evil = ("Host", "evil.example:8675");
    assert_eq!(http(s.port, "GET", "/api/datasets", &[evil], b"").0, 403);
}

#[test]
fn other_sites_pages_are_refused_and_nothing_frames_the_ui() {
    let s = start(true, 1 << 20);
    let cookie = cookie_for(s.port, TOKEN);
    let own_origin = format!("http://127.0.0.1:{}", s.port);
    for foreign in [
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-site"),
        ("Origin", "http://evil.example"),
        ("Origin", "null"),
        ("Origin", "http://127.0.0.1:1"),
    ] {
        // a read with the browser's cookie, a change with the header too
        let read = raw(
            s.port,
            "GET",
            "/api/datasets",
            &[("Cookie", &cookie), foreign],
            b"",
        );
        assert_eq!(read.0, 403, "{foreign:?}");
        let body = br#"{"name":"x"}"#;
        let change = http(s.port, "POST", "/api/datasets", &[JSON_CT, foreign], body);
        assert_eq!(change.0, 403, "{foreign:?}");
    }
    assert!(!s.root.join("datasets/x").exists());
    // the page's own requests pass
    let own = [
        ("Origin", own_origin.as_str()),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    assert_eq!(http(s.port, "GET", "/api/datasets", &own, b"").0, 200);
    // a link from elsewhere may navigate, and still needs the token
    let nav = [
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "navigate"),
    ];
    assert_eq!(raw(s.port, "GET", "/", &nav, b"").0, 401);
    // every response forbids framing: the sign-in page, a refusal, the page
    for (status, head, _) in [
        raw(s.port, "GET", "/", &[], b""),
        raw(
            s.port,
            "GET",
            "/",
            &[("Origin", "http://evil.example")],
            b"",
        ),
        http(s.port, "GET", "/", &[], b""),
    ] {
        let h = head.to_ascii_lowercase();
        assert!(h.contains("x-frame-options: deny"), "{status}: {head}");
        assert!(h.contains("frame-ancestors 'none'"), "{status}: {head}");
        assert!(h.contains("default-src 'self'"), "{status}: {head}");
    }
}

#[test]
fn the_token_is_escaped_in_the_page_and_no_auth_opens_reads_only() {
    let token = "tok\"><script>alert(1)</script>-0123456789";
    let s = start_with(true, true, token, Default::default(), 1 << 20);
    let (status, _, body) = raw(s.port, "GET", "/", &[("X-Lorakit-Token", token)], b"");
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(!body.contains("<script>alert"), "{body}");
    assert!(
        body.contains("content=\"tok&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;-0123456789\""),
        "{body}"
    );

    let s = start_with(true, false, TOKEN, Default::default(), 1 << 20);
    assert_eq!(raw(s.port, "GET", "/api/datasets", &[], b"").0, 200);
    let create = br#"{"name":"chars"}"#;
    assert_eq!(
        raw(s.port, "POST", "/api/datasets", &[JSON_CT], create).0,
        403
    );
    let evil = [("Origin", "http://evil.example")];
    assert_eq!(raw(s.port, "GET", "/api/datasets", &evil, b"").0, 403);
}

#[test]
fn off_loopback_every_request_needs_the_token() {
    let s = start(false, 1 << 20);
    let remote = ("Host", "10.0.0.5:8675");
    assert_eq!(raw(s.port, "GET", "/api/datasets", &[remote], b"").0, 401);
    assert_eq!(raw(s.port, "GET", "/", &[remote], b"").0, 401);
    let (status, head, _) = raw(s.port, "GET", &format!("/?token={TOKEN}"), &[remote], b"");
    assert_eq!(status, 303);
    assert!(
        set_cookie(&head).is_some_and(|c| c.contains("HttpOnly")),
        "{head}"
    );
    let cookie = cookie_for(s.port, TOKEN);
    let with_cookie = [remote, ("Cookie", cookie.as_str())];
    assert_eq!(
        raw(s.port, "GET", "/api/datasets", &with_cookie, b"").0,
        200
    );
    assert_eq!(http(s.port, "GET", "/api/datasets", &[remote], b"").0, 200);
}

/// How many of `socks` the server has closed (a read sees the end).
fn closed(socks: &[std::net::TcpStream]) -> usize {
    socks
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut r: &std::net::TcpStream = s;
            matches!(r.read(&mut [0u8; 1]), Ok(0))
        })
        .count()
}

#[test]
fn idle_connections_are_capped_and_timed_out() {
    use std::time::{Duration, Instant};
    // issue 26: ~1,100 idle sockets exhausted the descriptors, then runs'
    // logs could not be opened and a live run looked dead
    let limits = Limits {
        connections: 8,
        header_timeout: Duration::from_millis(500),
    };
    let s = start_limited(true, true, TOKEN, Default::default(), 1 << 20, limits);
    let idle: Vec<std::net::TcpStream> = (0..40)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    // one wave of 8 accepted and timed out; the rest wait in the backlog
    // (without the cap all 40 are accepted and closed together; without the
    // timeout none is closed)
    let first = closed(&idle);
    assert!(
        (1..=16).contains(&first),
        "{first} of 40 closed after 0.8 s"
    );
    // a real request gets through as the waves drain
    let t0 = Instant::now();
    assert_eq!(http(s.port, "GET", "/api/datasets", &[], b"").0, 200);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let t0 = Instant::now();
    while closed(&idle) < idle.len() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "idle sockets stay open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
