//! Who may talk to the UI — Jupyter's model.
//!
//! * **The token on every request** (the page, its scripts and the API,
//!   reads included): the `X-Lorakit-Token` header or the
//!   `lorakit_token_<port>` cookie (`HttpOnly`, `SameSite=Strict`; the port
//!   in its name keeps the cookie from other services on the host). The
//!   start-up line prints `http://127.0.0.1:8675/?token=…`; that first visit
//!   trades `?token=` for the cookie and is redirected to the same address
//!   without it, so the token leaves the address bar. Without the token a
//!   page gets "open the link lorakit printed", anything else a 401 — a
//!   local process that does not hold the token gets nothing else.
//! * **Changing requests** (POST, PUT, PATCH, DELETE) need the header: a
//!   page elsewhere can make a browser send a cookie but not a header
//!   (the CSRF guard). The page reads the token from a `<meta>` tag of its
//!   own HTML, which only holders of the token are served.
//! * **Browser defences on every route**: `Sec-Fetch-Site: cross-site` or
//!   `same-site` is refused (a top-level navigation excepted: it still
//!   needs the token), so is an `Origin` other than the UI's own; bound to
//!   a loopback address, the `Host` must name a loopback host (DNS
//!   rebinding). Every response forbids framing (`X-Frame-Options: DENY`,
//!   `frame-ancestors 'none'`) and the page runs under a strict
//!   Content-Security-Policy (its own scripts and styles only).
//! * `--no-auth` lets reads through without the token, as before: for a
//!   single-user machine. The rest stays.
//!
//! Tokens are compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use std::sync::Arc;

/// The header mutating requests carry.
pub const TOKEN_HEADER: &str = "x-lorakit-token";

/// A fresh random token (128 bits, hex).
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equality whose time does not depend on where the strings differ.
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// What the guard needs to know.
#[derive(Debug, Clone)]
pub struct Access {
    /// The token.
    pub token: String,
    /// Bound to a loopback address (from the bound socket, not `--host`).
    pub loopback: bool,
    /// The port the UI listens on: names the cookie.
    pub port: u16,
    /// Reads need the token (`false`: `--no-auth`).
    pub auth: bool,
}

impl Access {
    /// The cookie that carries the token, per port.
    pub fn cookie_name(&self) -> String {
        format!("lorakit_token_{}", self.port)
    }
}

/// `localhost` or a loopback address (`127.x.x.x`, `::1`, `[::1]`): the
/// rule for the `Host` the UI answers to when it is bound to loopback.
pub fn is_loopback_name(name: &str) -> bool {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn header(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|h| h.to_str().ok())
}

fn host_is_loopback(headers: &HeaderMap) -> bool {
    let host = header(headers, header::HOST).unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.chars().all(|c| c.is_ascii_digit()) && !n.ends_with(':') => n,
        _ => host,
    };
    is_loopback_name(name)
}

/// Why a request that a browser made for another site is refused, if it is.
fn foreign(headers: &HeaderMap, method: &Method) -> Option<&'static str> {
    let navigation =
        *method == Method::GET && header(headers, "sec-fetch-mode") == Some("navigate");
    if matches!(
        header(headers, "sec-fetch-site"),
        Some("cross-site" | "same-site")
    ) && !navigation
    {
        return Some("refused: the request comes from another site's page");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = header(headers, header::HOST).unwrap_or_default();
        let own = |scheme: &str| origin.as_bytes() == format!("{scheme}://{host}").as_bytes();
        if host.is_empty() || !(own("http") || own("https")) {
            return Some("refused: the request comes from another origin's page");
        }
    }
    None
}

/// The token as presented: header, cookie, `?token=`.
fn presented(req: &Request, cookie_name: &str) -> [Option<String>; 3] {
    let cookie = header(req.headers(), header::COOKIE).and_then(|c| {
        c.split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == cookie_name)
            .map(|(_, v)| v.to_string())
    });
    [
        header(req.headers(), TOKEN_HEADER).map(str::to_string),
        cookie,
        token_in_query(req.uri().query()),
    ]
}

fn token_in_query(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v.to_string())
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": why }))).into_response()
}

/// The page a browser without the token gets.
const SIGN_IN: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>lorakit ui</title></head><body><h1>lorakit ui</h1><p>This UI needs its token. Open the link <code>lorakit ui</code> printed when it started (<code>http://…/?token=…</code>): it signs this browser in.</p><p>The token is new at every start unless <code>LORAKIT_UI_TOKEN</code> is set.</p></body></html>";

/// The address without its `token` parameter.
fn without_token(uri: &axum::http::Uri) -> String {
    let rest: Vec<&str> = (uri.query().unwrap_or_default().split('&'))
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some("token"))
        .collect();
    match rest.is_empty() {
        true => uri.path().to_string(),
        false => format!("{}?{}", uri.path(), rest.join("&")),
    }
}

/// The headers every response carries: no framing, no sniffing, no
/// referrer, and the page's own scripts and styles only.
fn protect(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The middleware: applies the rules above to every request.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let mut resp = decide(&access, req, next).await;
    protect(&mut resp);
    resp
}

async fn decide(access: &Access, req: Request, next: Next) -> Response {
    if access.loopback && !host_is_loopback(req.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this UI answers only to localhost / 127.0.0.1 (Host header)",
        );
    }
    if let Some(why) = foreign(req.headers(), req.method()) {
        return refuse(StatusCode::FORBIDDEN, why);
    }
    let [header_token, cookie, query] = presented(&req, &access.cookie_name());
    let ok = |t: &Option<String>| t.as_deref().is_some_and(|t| same_token(t, &access.token));
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if mutating && !ok(&header_token) {
        return refuse(
            StatusCode::FORBIDDEN,
            "a changing request needs the X-Lorakit-Token header (the page sends it)",
        );
    }
    if !mutating && ok(&query) {
        // the printed link: the token becomes the cookie and leaves the address
        let cookie = format!(
            "{}={}; HttpOnly; SameSite=Strict; Path=/",
            access.cookie_name(),
            access.token
        );
        let mut resp = Redirect::to(&without_token(req.uri())).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    if access.auth && !ok(&header_token) && !ok(&cookie) {
        let page = *req.method() == Method::GET && !req.uri().path().starts_with("/api/");
        if page {
            return (StatusCode::UNAUTHORIZED, Html(SIGN_IN)).into_response();
        }
        return refuse(
            StatusCode::UNAUTHORIZED,
            "this UI needs its token: open the address lorakit ui printed (…/?token=…)",
        );
    }
    next.run(req).await
}

/// `text` safe inside an HTML attribute or element.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names() {
        for yes in ["localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]"] {
            assert!(is_loopback_name(yes), "{yes}");
        }
        for no in [
            "0.0.0.0",
            "10.0.0.5",
            "evil.example",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!is_loopback_name(no), "{no}");
        }
    }

    #[test]
    fn tokens_compare_exactly() {
        let t = new_token();
        assert_eq!(t.len(), 32);
        assert_ne!(t, new_token());
        assert!(same_token(&t, &t.clone()));
        assert!(!same_token(&t, &t[..31]));
        assert!(!same_token(&t, &format!("{t}0")));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("", "a"));
    }
}
