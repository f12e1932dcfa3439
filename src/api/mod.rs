//! The HTTP API (`/v1`, JSON): enqueue, read, list, cancel, steps, health and metrics.
//!
//! The router is built by [`router`] from an [`AppState`]; tests drive it through a real
//! listener. Handlers never write SQL: they call `crate::db`.

pub mod edge;
mod error;
mod key_stream;
pub mod openapi;
mod overview;
mod runs;
pub mod server;
pub mod slow_clients;
mod stream;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;

pub use edge::EdgePolicy;
pub use error::ApiError;
pub use stream::AttachLimits;

use crate::executor::Metrics;
use crate::live::LiveOutput;
use crate::workflow::Registry;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    /// Workflows this process knows (the API also accepts those of live executors).
    pub registry: Registry,
    pub api_token: Option<Arc<str>>,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    /// Live output (NATS); `None` when not configured: attach answers 503.
    pub live: Option<Arc<LiveOutput>>,
    pub attach: Arc<AttachLimits>,
    /// Hosts and origins this server answers to (see `edge`).
    pub edge: Arc<EdgePolicy>,
    pub readiness: Arc<Readiness>,
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/runs", post(runs::enqueue).get(runs::list))
        .route("/v1/runs/{id}", get(runs::show))
        .route("/v1/runs/{id}/steps", get(runs::steps))
        .route("/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/v1/runs/{id}/stream", get(stream::attach))
        .route("/v1/keys/{key}/stream", get(key_stream::attach_key))
        .route("/v1/counts", get(overview::counts))
        .route("/v1/executors", get(overview::executors))
        .route("/v1/queues", get(overview::queues))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            edge::require_token,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), edge::checks));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(v1)
        .merge(openapi::routes(state.clone()))
        .merge(crate::ui::routes(state.clone()))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// How long one readiness result answers `/readyz`: a flood of probes costs the database one
/// query per second, not one per request.
const READINESS_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// The last readiness result, shared by every `/readyz`; one check at a time (the others wait
/// for it and take its result).
#[derive(Debug, Default)]
pub struct Readiness {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<bool, String>)>>,
}

impl Readiness {
    async fn check(&self, state: &AppState) -> Result<bool, String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last {
            if at.elapsed() < READINESS_TTL {
                return result.clone();
            }
        }
        state
            .metrics
            .readiness_checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let check = async {
            let client = state.pool.get().await?;
            crate::migrate::is_current(&client).await
        };
        let result = match tokio::time::timeout(READINESS_TTL * 2, check).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("the database did not answer in time".to_string()),
        };
        *last = Some((tokio::time::Instant::now(), result.clone()));
        result
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.readiness.check(&state).await {
        Ok(true) => Json(json!({"status": "ready"})).into_response(),
        Ok(false) => {
            ApiError::unavailable("database schema is not migrated to this version").into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            ApiError::unavailable("database unreachable").into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    text.push_str(&format!(
        "# HELP spool_attachers Clients attached to live output\n# TYPE spool_attachers gauge\nspool_attachers {}\n",
        state.attach.current()
    ));
    if let Some(live) = &state.live {
        text.push_str(&format!(
            "# HELP spool_attach_feeds Attached runs read by this process (one JetStream consumer each)
# TYPE spool_attach_feeds gauge
spool_attach_feeds {}
",
            live.feeds.count()
        ));
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}
