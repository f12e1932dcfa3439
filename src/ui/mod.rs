//! The web view: `GET /` redirects to `/ui/`, which serves a small single-page app embedded in
//! the binary (`assets/`: plain HTML, CSS and one JavaScript module, no build step, no external
//! network). It reads the same `/v1` API as any client.
//!
//! Sign-in. With `SPOOL_API_TOKEN` set, the page asks for the token once and posts it to
//! `POST /ui/session`, which answers with a session cookie: HTTP-only (page scripts cannot read
//! it), `SameSite=Strict` (other sites' pages cannot send it), twelve hours long. Its value is an
//! expiry and an HMAC of it keyed by a hash of the token, so it names no secret, needs no server
//! state (any `spool serve` with the same token accepts it) and dies when the token changes. The
//! `/v1` token check accepts the cookie as it accepts the bearer header; that is how the page's
//! `EventSource` attaches (it cannot send headers) with no token in any URL. A request that
//! changes something and is authenticated by the cookie must also carry `Origin`, which the edge
//! checks against this server's own (a second guard against cross-site requests).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::api::openapi::schemas::{ErrorBody, SessionState, SignedIn};
use crate::api::{edge, ApiError, AppState};

/// Name of the session cookie.
pub const COOKIE: &str = "spool_session";
/// How long a session lasts, in seconds.
const SESSION_SECS: i64 = 12 * 3600;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
/// Everything the page loads comes from this server; it cannot be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The view's routes, behind the same host and origin checks as `/v1`.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/", get(root))
        .route("/ui", get(ui_without_slash))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route(
            "/ui/session",
            get(session_state).post(sign_in).delete(sign_out),
        )
        .layer(middleware::from_fn_with_state(state, edge::checks))
}

/// Redirects to the web view
#[utoipa::path(get, path = "/", tag = "web view",
    responses((status = 303, description = "To `/ui/`.", headers(("Location" = String, description = "`/ui/`")))))]
async fn root() -> Redirect {
    Redirect::to("/ui/")
}

/// Redirects to the web view
#[utoipa::path(get, path = "/ui", tag = "web view",
    responses((status = 303, description = "To `/ui/`.", headers(("Location" = String, description = "`/ui/`")))))]
async fn ui_without_slash() -> Redirect {
    Redirect::to("/ui/")
}

/// The web view's page
#[utoipa::path(get, path = "/ui/", tag = "web view",
    responses((status = 200, description = "The single-page app (no token needed: it holds no data).", content_type = "text/html", body = String)))]
async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// The web view's script
#[utoipa::path(get, path = "/ui/app.js", tag = "web view",
    responses((status = 200, description = "Its one JavaScript module.", content_type = "text/javascript", body = String)))]
async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// The web view's style sheet
#[utoipa::path(get, path = "/ui/app.css", tag = "web view",
    responses((status = 200, description = "Its CSS.", content_type = "text/css", body = String)))]
async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn session_mac(token: &str, expires: i64) -> Vec<u8> {
    let key = Sha256::new()
        .chain_update(b"spool-ui-session\0")
        .chain_update(token.as_bytes())
        .finalize();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(expires.to_string().as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A session value for `token` that expires at `expires` (Unix seconds).
fn mint(token: &str, expires: i64) -> String {
    format!("{expires}.{}", hex::encode(session_mac(token, expires)))
}

/// Whether `value` is a session minted for `token` that has not expired at `now`.
fn session_valid_at(token: &str, value: &str, now: i64) -> bool {
    let Some((expires, mac)) = value.split_once('.') else {
        return false;
    };
    let (Ok(expires), Ok(mac)) = (expires.parse::<i64>(), hex::decode(mac)) else {
        return false;
    };
    expires > now && bool::from(session_mac(token, expires).ct_eq(&mac))
}

/// Whether the request carries a live session cookie for `token`.
pub fn has_session(token: &str, headers: &HeaderMap) -> bool {
    let now = now_secs();
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(name, value)| name == COOKIE && session_valid_at(token, value, now))
}

fn cookie(value: &str, max_age: i64, headers: &HeaderMap) -> HeaderValue {
    // `Secure` when the client reached us over HTTPS (through a proxy that says so)
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let secure = if https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("the cookie is ASCII")
}

/// The web view's sign-in state
#[utoipa::path(get, path = "/ui/session", tag = "web view",
    responses((status = 200, description = "Whether a token is needed and whether this request's session cookie is live.", body = SessionState)))]
async fn session_state(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let signed_in = match &state.api_token {
        None => true,
        Some(token) => has_session(token, &headers),
    };
    let mut response = Json(json!({
        "auth_required": state.api_token.is_some(),
        "signed_in": signed_in,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Body of `POST /ui/session`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SignIn {
    /// The server's `SPOOL_API_TOKEN`.
    token: String,
}

/// Sign in: trade the API token for a session cookie
///
/// The cookie (`spool_session`: HTTP-only, `SameSite=Strict`, twelve hours, `Secure` behind a
/// proxy that says `X-Forwarded-Proto: https`) is accepted by `/v1` as the bearer token is. A
/// server without a token answers 200 and sets no cookie.
#[utoipa::path(post, path = "/ui/session", tag = "web view",
    request_body(content = SignIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Signed in.", body = SignedIn,
            headers(("Set-Cookie" = String, description = "The session cookie (only when the server has a token)."))),
        (status = 400, description = "`invalid_body`: not `{\"token\": \"...\"}`; `bad_body`: the body could not be read.", body = ErrorBody),
        (status = 401, description = "`unauthorized`: not this server's token.", body = ErrorBody),
    ))]
async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|_| ApiError::bad_request("bad_body", "cannot read the body"))?;
    let SignIn { token: given } = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request("invalid_body", "expected a JSON body {\"token\": \"...\"}")
    })?;
    let Some(expected) = &state.api_token else {
        return Ok(Json(json!({"signed_in": true})).into_response());
    };
    let matches =
        Sha256::digest(given.trim().as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes()));
    if !bool::from(matches) {
        tracing::info!("web view sign-in with a wrong token");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that is not this server's API token",
        ));
    }
    let value = mint(expected, now_secs() + SESSION_SECS);
    let mut response = Json(json!({"signed_in": true})).into_response();
    let h = response.headers_mut();
    h.insert(header::SET_COOKIE, cookie(&value, SESSION_SECS, &headers));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Sign out: clear the session cookie
#[utoipa::path(delete, path = "/ui/session", tag = "web view",
    responses((status = 204, description = "Signed out.",
        headers(("Set-Cookie" = String, description = "Expires the session cookie.")))))]
async fn sign_out(headers: HeaderMap) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0, &headers));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_for_its_token_until_it_expires() {
        let token = "a-token-of-sixteen-chars";
        let value = mint(token, 1_000);
        assert!(session_valid_at(token, &value, 999));
        assert!(!session_valid_at(token, &value, 1_000), "expired");
        assert!(!session_valid_at("another-token-entirely", &value, 999));
        assert!(!value.contains(token));
        // a forged expiry does not carry the old MAC along
        let (_, mac) = value.split_once('.').unwrap();
        assert!(!session_valid_at(token, &format!("9999999999.{mac}"), 999));
        assert!(!session_valid_at(token, "garbage", 0));
        assert!(!session_valid_at(token, "1000.zz", 0));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let token = "a-token-of-sixteen-chars";
        let mut headers = HeaderMap::new();
        let value = mint(token, now_secs() + 60);
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={value}; c=d")).unwrap(),
        );
        assert!(has_session(token, &headers));
        assert!(!has_session("another-token-entirely", &headers));
    }
}
