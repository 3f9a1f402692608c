//! Who may talk to the UI.
//!
//! * Bound to a loopback address (the default), reads need nothing, but the
//!   `Host` header must name a loopback host (a page on another site cannot
//!   reach the UI through DNS rebinding).
//! * Bound to any other address, every request needs the token: the
//!   `X-Lorakit-Token` header, the `lorakit_token` cookie, or `?token=` on
//!   the page's address (which sets the cookie).
//! * Every mutating request (POST, PUT, PATCH, DELETE) needs the header,
//!   wherever the UI is bound. A cross-site page can make a browser send a
//!   cookie but not a custom header, so this is the CSRF guard. The page
//!   gets the token in a `<meta>` tag of its own HTML.
//!
//! Tokens are compared in constant time.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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
    /// Bound to a loopback address.
    pub loopback: bool,
}

/// `localhost` or a loopback address (`127.x.x.x`, `::1`, `[::1]`): the
/// rule for both the address the UI binds and the `Host` it answers to.
pub fn is_loopback_name(name: &str) -> bool {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn host_is_loopback(headers: &HeaderMap) -> bool {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((n, port)) if port.chars().all(|c| c.is_ascii_digit()) && !n.ends_with(':') => n,
        _ => host,
    };
    is_loopback_name(name)
}

fn presented(req: &Request) -> (Option<String>, Option<String>, Option<String>) {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let cookie = h("cookie").and_then(|c| {
        c.split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == "lorakit_token")
            .map(|(_, v)| v.to_string())
    });
    let query = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_string())
    });
    (h(TOKEN_HEADER), cookie, query)
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": why }))).into_response()
}

/// The middleware: applies the rules above to every request.
pub async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    if access.loopback && !host_is_loopback(req.headers()) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this UI answers only to localhost / 127.0.0.1 (Host header)",
        );
    }
    let (header_token, cookie, query) = presented(&req);
    let ok = |t: &Option<String>| t.as_deref().is_some_and(|t| same_token(t, &access.token));
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if mutating && !ok(&header_token) {
        return refuse(
            StatusCode::FORBIDDEN,
            "a changing request needs the X-Lorakit-Token header (the page sends it)",
        );
    }
    let has_token = ok(&header_token) || ok(&cookie) || ok(&query);
    if !access.loopback && !has_token {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "this UI needs its token: open the address lorakit ui printed (…/?token=…)",
        );
    }
    let set_cookie = ok(&query) && !ok(&cookie);
    let mut resp = next.run(req).await;
    if set_cookie {
        if let Ok(v) = format!(
            "lorakit_token={}; HttpOnly; SameSite=Strict; Path=/",
            access.token
        )
        .parse()
        {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
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
