//! The HTTP API (`/v1`, JSON): enqueue, read, list, cancel, steps, health and metrics.
//!
//! The router is built by [`router`] from an [`AppState`]; tests drive it through a real
//! listener. Handlers never write SQL: they call `crate::db`.

mod error;
mod runs;
pub mod slow_clients;
mod stream;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde_json::json;
use subtle::ConstantTimeEq;

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
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/runs", post(runs::enqueue).get(runs::list))
        .route("/v1/runs/{id}", get(runs::show))
        .route("/v1/runs/{id}/steps", get(runs::steps))
        .route("/v1/runs/{id}/cancel", post(runs::cancel))
        .route("/v1/runs/{id}/stream", get(stream::attach))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(v1)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let check = async {
        let client = state.pool.get().await?;
        crate::migrate::is_current(&client).await
    };
    match check.await {
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
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}
