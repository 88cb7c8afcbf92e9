//! The token check and the cross-site guard every route but `/healthz`
//! passes through, and the login cookie.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;

use super::console::{Console, TOKEN_VARIABLE};
use super::extract::ApiError;

/// The cookie the login page sets.
pub(super) const COOKIE: &str = "kser_token";

/// Compares two secrets in time independent of where they differ.
pub(super) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The token a request presents: a bearer token, the password of HTTP
/// Basic, or the login cookie.
pub(super) fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(token) = value.strip_prefix("Bearer ") {
            return Some(token.trim().to_owned());
        }
        if let Some(encoded) = value.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            return decoded
                .split_once(':')
                .map(|(_, password)| password.to_owned());
        }
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Whether a POST comes from a page of another site: `Sec-Fetch-Site`
/// says so, or `Origin` names another host than the one asked. Clients
/// that are not browsers send neither and cannot be driven by a site.
pub(super) fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    host != Some(origin_host)
}

/// Checks the token (when one is set) and refuses cross-site POSTs.
pub(super) async fn guard(
    State(console): State<Console>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    if request.method() == Method::POST && cross_site(request.headers()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-site request refused: actions must come from the console's own pages",
        )
        .into_response();
    }
    let Some(token) = &console.inner.token else {
        return next.run(request).await;
    };
    if path == "/login" || path == "/healthz" || path == "/assets/console.css" {
        return next.run(request).await;
    }
    let presented = presented_token(request.headers());
    if presented.is_some_and(|presented| same_secret(&presented, token)) {
        return next.run(request).await;
    }
    let wants_page = !path.starts_with("/api/") && !path.starts_with("/topic/");
    if wants_page && request.method() == Method::GET {
        return Redirect::to("/login").into_response();
    }
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("authentication required: send Authorization: Bearer <{TOKEN_VARIABLE}>"),
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer, Basic realm=\"kser\""),
    );
    response
}

/// The `Set-Cookie` value that logs a browser in with `token`.
pub(super) fn login_cookie(token: &str) -> String {
    format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_bearer_basic_or_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(presented_token(&headers).as_deref(), Some("s3cret"));
        let basic = base64::engine::general_purpose::STANDARD.encode("user:s3cret");
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(presented_token(&headers).as_deref(), Some("s3cret"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "a=b; kser_token=t0k".parse().unwrap());
        assert_eq!(presented_token(&headers).as_deref(), Some("t0k"));
        assert_eq!(presented_token(&HeaderMap::new()), None);
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let mut headers = HeaderMap::new();
        assert!(!cross_site(&headers), "curl sends no Origin");
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!cross_site(&headers));
        headers.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(cross_site(&headers));
        headers.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(cross_site(&headers));
        headers.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(!cross_site(&headers));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
