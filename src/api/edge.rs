//! What every request passes before a handler: size, content type, host and origin checks, and
//! the token.
//!
//! - A `Content-Length` above the body limit is answered `413` from the header alone, before a
//!   byte of the body is read.
//! - A request with a body must say `Content-Type: application/json` (or `…+json`): a web page
//!   can send `text/plain` across sites without asking, never JSON (`415`).
//! - `Host` must be one this server answers to. Listening on a loopback address, that is only
//!   loopback names (`localhost`, `*.localhost`, `127.0.0.1`, `[::1]`), so a page whose DNS name
//!   is rebound to 127.0.0.1 cannot read the API; elsewhere any host, unless `SPOOL_ALLOWED_HOSTS`
//!   lists them (`421`).
//! - A request from a browser page carries `Origin`: it must be this server's own (same host and
//!   port as `Host`) or listed in `SPOOL_ALLOWED_ORIGINS` (`403`). Requests without `Origin`
//!   (curl, SDKs, servers) are not cross-site requests and pass.
//! - With `SPOOL_API_TOKEN`, `/v1` and `/metrics` need `Authorization: Bearer <token>` (the scheme
//!   in any case); the token is compared as SHA-256 digests in constant time, so neither its
//!   content nor its length leaks through timing. The web view's session cookie (see `ui`) is
//!   accepted instead; with it, a request other than GET or HEAD must carry `Origin`.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// Which hosts and origins a server answers to.
#[derive(Debug, Clone)]
pub struct EdgePolicy {
    /// `None`: any host.
    hosts: Option<Vec<String>>,
    origins: Vec<String>,
}

impl EdgePolicy {
    /// The policy of a server listening on `listen`: with no hosts configured, loopback names
    /// only on a loopback address, any host elsewhere. `*` in `hosts` means any host.
    pub fn new(listen: SocketAddr, hosts: &[String], origins: &[String]) -> Self {
        let hosts = if hosts.iter().any(|h| h == "*") {
            None
        } else if !hosts.is_empty() {
            Some(hosts.iter().map(|h| h.to_ascii_lowercase()).collect())
        } else if listen.ip().is_loopback() {
            Some(vec![])
        } else {
            None
        };
        Self {
            hosts,
            origins: origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// The policy of a server on a loopback address with no hosts or origins configured.
    pub fn loopback() -> Self {
        Self::new(SocketAddr::from(([127, 0, 0, 1], 0)), &[], &[])
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        let name = host_name(host);
        if hosts.is_empty() {
            return is_loopback_name(&name);
        }
        hosts.iter().any(|h| *h == name || *h == host)
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.iter().any(|o| *o == origin || o == "*") {
            return true;
        }
        // same origin: the origin's authority is the request's Host
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        match (authority, host) {
            (Some(a), Some(h)) => a == h.to_ascii_lowercase(),
            _ => false,
        }
    }
}

/// The host part of a `Host` header (no port, brackets kept for IPv6), lower case.
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => host[..=end].to_string(),
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
        _ => host,
    }
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An HTTP/1.1 request has a body when it says so: `Transfer-Encoding`, or a `Content-Length`
/// above zero.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || content_length(headers).is_some_and(|n| n > 0)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Size, content type, host and origin (see the module docs).
pub async fn checks(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if content_length(headers).is_some_and(|n| n > state.max_body_bytes as u64) {
        let mut response = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {} bytes", state.max_body_bytes),
        )
        .into_response();
        // the body is not read: the connection cannot be reused
        response
            .headers_mut()
            .insert(header::CONNECTION, "close".parse().expect("valid"));
        return response;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(host) = host {
        if !state.edge.host_allowed(host) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown_host",
                format!(
                    "this server does not answer to host {host:?}; list it in SPOOL_ALLOWED_HOSTS"
                ),
            )
            .into_response();
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !state.edge.origin_allowed(origin, host) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_origin",
                format!(
                    "requests from origin {origin:?} are refused; list it in SPOOL_ALLOWED_ORIGINS"
                ),
            )
            .into_response();
        }
    }
    if has_body(headers) && !is_json(headers) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be JSON (Content-Type: application/json)",
        )
        .into_response();
    }
    next.run(request).await
}

/// The token check of `/v1` and `/metrics` (see the module docs).
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = &state.api_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .unwrap_or("");
        let bearer_ok = bool::from(
            Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes())),
        );
        if !bearer_ok {
            if !crate::ui::has_session(expected, request.headers()) {
                return ApiError::unauthorized().into_response();
            }
            // the web view's session cookie: a request that changes something must also show
            // where it comes from (`checks` has already refused a foreign `Origin`)
            let safe = matches!(request.method(), &Method::GET | &Method::HEAD);
            if !safe && request.headers().get(header::ORIGIN).is_none() {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "origin_required",
                    "a request authenticated by the session cookie must carry Origin",
                )
                .into_response();
            }
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_server_answers_to_loopback_names_only() {
        let p = EdgePolicy::loopback();
        for ok in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "app.localhost:3",
            "[::1]:80",
        ] {
            assert!(p.host_allowed(ok), "{ok}");
        }
        for bad in ["evil.example:8080", "127.0.0.1.evil.example", "10.0.0.1:80"] {
            assert!(!p.host_allowed(bad), "{bad}");
        }
        let any = EdgePolicy::new("0.0.0.0:80".parse().unwrap(), &[], &[]);
        assert!(any.host_allowed("spool.internal:8080"));
        let listed = EdgePolicy::new(
            "0.0.0.0:80".parse().unwrap(),
            &["spool.internal".into()],
            &[],
        );
        assert!(listed.host_allowed("spool.internal:8080"));
        assert!(!listed.host_allowed("evil.example"));
    }

    #[test]
    fn an_origin_passes_when_it_is_the_servers_own_or_listed() {
        let p = EdgePolicy::new(
            "127.0.0.1:80".parse().unwrap(),
            &[],
            &["https://app.example".into()],
        );
        assert!(p.origin_allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(p.origin_allowed("https://app.example/", Some("127.0.0.1:8080")));
        assert!(!p.origin_allowed("http://evil.example", Some("127.0.0.1:8080")));
        assert!(!p.origin_allowed("null", Some("127.0.0.1:8080")));
        assert!(!p.origin_allowed("http://127.0.0.1:9999", Some("127.0.0.1:8080")));
    }
}
