//! `GET /v1/openapi.json`: the HTTP API as an OpenAPI 3.1 document, assembled from the code.
//!
//! Why from the code: a hand-written description drifts from the handlers the day someone adds
//! a field. Here each handler carries its own `#[utoipa::path]` (its parameters, body and every
//! status it answers, with the error codes), and the types it reads or writes derive
//! `ToSchema` (`Run`, `StepRecord`, `EnqueueRequest`, …); JSON built by `json!` or by
//! PostgreSQL is described by the types in [`schemas`]. This module adds what no handler can
//! say about itself:
//!
//! - `/healthz`, `/readyz` and `/metrics`, whose handlers sit in `api/mod.rs`, are described by
//!   the stand-in functions below;
//! - the answers of the middleware in front of the handlers ([`super::edge`]): 403, 413, 415
//!   and 421 on every route behind the host and origin checks, 401 and the security
//!   requirement (bearer token or session cookie) on every route behind the token check. Which
//!   route sits behind which layer mirrors `super::router`;
//! - the events of the two SSE endpoints as machine-readable extensions (`x-sse-events`, each
//!   event's data as a JSON schema, and `x-sse-event-id`), since OpenAPI 3.1 has no way to say
//!   what travels inside `text/event-stream`.
//!
//! The document is served without a token: it describes the API, not its data, and tools
//! (client generators, API explorers) fetch it before anyone has handed them a token. It still
//! passes the host and origin checks, like every other route but the probes.
//!
//! `tests/core/openapi.rs` holds the document to the server: valid by `openapi-spec-validator`,
//! every route served is in it and every path in it is served, the token and host checks answer
//! where it says they do, and real responses validate against its schemas.

pub mod schemas;

use std::sync::OnceLock;

use axum::http::header;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{Components, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{edge, AppState};
use schemas::{ErrorBody, Healthy, KeyRunFrame, Ready};

/// Where the document is served.
pub const PATH: &str = "/v1/openapi.json";

/// Serves the document, behind the host and origin checks but not the token (see the module
/// docs).
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route(PATH, get(openapi_json))
        .layer(middleware::from_fn_with_state(state, edge::checks))
}

/// The document as JSON, built once.
pub fn document_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        document()
            .to_pretty_json()
            .expect("the document serializes")
    })
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This document
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The HTTP API as an OpenAPI 3.1 document (no token needed).",
        content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Spool",
        description = "A durable run queue on PostgreSQL: enqueue runs, read them, cancel them, \
            follow their live output (Server-Sent Events), and watch queues and executors.\n\n\
            Every error is `{\"error\": {\"code\", \"message\"}}` (`ErrorBody`); each response \
            names the codes it can carry. With `SPOOL_API_TOKEN` set, `/v1` (but this document) \
            and `/metrics` need `Authorization: Bearer <token>` or the web view's session \
            cookie; a server without a token checks neither. Every route but `/healthz` and \
            `/readyz` answers only to the hosts and browser origins it is configured for \
            (421, 403), and a request with a body must be JSON (415) within \
            `SPOOL_MAX_BODY_BYTES` (413)."
    ),
    paths(
        super::runs::enqueue,
        super::runs::list,
        super::runs::show,
        super::runs::steps,
        super::runs::cancel,
        super::stream::attach,
        super::key_stream::attach_key,
        super::overview::counts,
        super::overview::executors,
        super::overview::queues,
        openapi_json,
        metrics,
        healthz,
        readyz,
        crate::ui::root,
        crate::ui::ui_without_slash,
        crate::ui::index,
        crate::ui::app_js,
        crate::ui::app_css,
        crate::ui::session_state,
        crate::ui::sign_in,
        crate::ui::sign_out,
    ),
    components(schemas(KeyRunFrame)),
    modifiers(&Assembly),
    tags(
        (name = "runs", description = "Enqueue, read, list and cancel runs."),
        (name = "live output", description = "Follow a run's output, or a conversation's, as it is written (Server-Sent Events)."),
        (name = "overview", description = "What the web view polls: counts, executors, queues."),
        (name = "health", description = "Probes and metrics."),
        (name = "web view", description = "The embedded web view and its sign-in."),
        (name = "meta", description = "This document."),
    )
)]
struct ApiDoc;

// Stand-ins for the handlers of `api/mod.rs` (see the module docs): never called.

/// Liveness
///
/// The process answers HTTP; nothing else is checked. No token needed.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive.", body = Healthy)))]
#[allow(dead_code)]
fn healthz() {}

/// Readiness
///
/// The database answers and its schema is this version's. One check a second is shared by all
/// probes. No token needed.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready.", body = Ready),
        (status = 503, description = "`unavailable`: the database is unreachable, or its schema is not migrated to this version.", body = ErrorBody),
    ))]
#[allow(dead_code)]
fn readyz() {}

/// Prometheus metrics
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "The Prometheus text format, version 0.0.4.",
        content_type = "text/plain", body = String)))]
#[allow(dead_code)]
fn metrics() {}

/// Which middleware stands in front of a route, as `super::router` layers them.
struct Layers {
    /// `edge::checks`: host, origin, content type and size.
    checks: bool,
    /// `edge::require_token`.
    token: bool,
}

fn layers(path: &str) -> Layers {
    let probe = matches!(path, "/healthz" | "/readyz");
    Layers {
        checks: !probe,
        token: (path.starts_with("/v1/") && path != PATH) || path == "/metrics",
    }
}

/// What the derive cannot say (see the module docs).
struct Assembly;

impl Modify for Assembly {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Components::new);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`Authorization: Bearer <SPOOL_API_TOKEN>` (the scheme in any case). Not \
                         checked by a server without a token.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::ui::COOKIE,
                "The web view's session cookie, from `POST /ui/session`. A request other than \
                 GET or HEAD authenticated by it must carry `Origin` (403 `origin_required`).",
            ))),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let layers = layers(path);
            let stream = match path.as_str() {
                "/v1/runs/{id}/stream" => Some(false),
                "/v1/keys/{key}/stream" => Some(true),
                _ => None,
            };
            for op in operations(item) {
                if layers.checks {
                    add_edge_responses(op, layers.token);
                }
                if layers.token {
                    op.security = Some(vec![
                        SecurityRequirement::new("bearer", Vec::<String>::new()),
                        SecurityRequirement::new("session", Vec::<String>::new()),
                    ]);
                    add_error(
                        op,
                        "401",
                        "`unauthorized`: no bearer token or session cookie, or a wrong one.",
                    );
                }
                if let Some(key_stream) = stream {
                    let extensions = op.extensions.get_or_insert_with(Default::default);
                    extensions.insert("x-sse-events".to_string(), schemas::sse_events(key_stream));
                    extensions.insert(
                        "x-sse-event-id".to_string(),
                        schemas::sse_event_id(key_stream),
                    );
                }
            }
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// The answers of `edge::checks` (and the cookie's origin rule of `edge::require_token`).
fn add_edge_responses(op: &mut Operation, token: bool) {
    let forbidden = if token {
        "`cross_origin`: the request's `Origin` is neither this server's nor listed in \
         `SPOOL_ALLOWED_ORIGINS`; `origin_required`: a request other than GET or HEAD \
         authenticated by the session cookie carries no `Origin`."
    } else {
        "`cross_origin`: the request's `Origin` is neither this server's nor listed in \
         `SPOOL_ALLOWED_ORIGINS`."
    };
    add_error(op, "403", forbidden);
    add_error(
        op,
        "413",
        "`payload_too_large`: the body (or its `Content-Length`) is over `SPOOL_MAX_BODY_BYTES`.",
    );
    add_error(
        op,
        "415",
        "`unsupported_media_type`: a request body that is not `Content-Type: application/json` \
         (or `…+json`).",
    );
    add_error(
        op,
        "421",
        "`unknown_host`: the `Host` is not one this server answers to (on a loopback address: \
         loopback names only; elsewhere `SPOOL_ALLOWED_HOSTS`).",
    );
}

/// Adds an error response unless the handler already describes that status.
fn add_error(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        });
}
