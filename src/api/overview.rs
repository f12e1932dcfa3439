//! The operator's overview: `GET /v1/counts` (runs per status), `GET /v1/executors` (liveness
//! and leases) and `GET /v1/queues` (depth and oldest age per queue and key, and the runs nobody
//! can execute with the reason). The web view polls these; so can a script.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ErrorBody;
use super::openapi::schemas::{CountsResponse, ExecutorList, QueueOverview};
use super::{ApiError, AppState};
use crate::db::overview::{self, CountFilter};

/// Filters of `GET /v1/counts` (an empty value matches everything); unknown parameters are
/// refused (400 `invalid_query`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CountQuery {
    /// Only runs of this workflow.
    workflow: Option<String>,
    /// Only runs of this queue.
    queue: Option<String>,
    /// Only runs of this concurrency key.
    concurrency_key: Option<String>,
}

/// How many concurrency keys and unrunnable runs `GET /v1/queues` lists at most.
const MAX_KEYS: i64 = 100;
const MAX_UNRUNNABLE: i64 = 100;

/// Runs per status
#[utoipa::path(
    get,
    path = "/v1/counts",
    tag = "overview",
    params(CountQuery),
    responses(
        (status = 200, description = "Every status, zero when no run has it.", body = CountsResponse),
        (status = 400, description = "`invalid_query`: an unknown parameter.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
pub async fn counts(
    State(state): State<AppState>,
    query: Result<Query<CountQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let filter = CountFilter {
        workflow: nonempty(q.workflow),
        queue: nonempty(q.queue),
        concurrency_key: nonempty(q.concurrency_key),
    };
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let counts = overview::status_counts(&client, &filter).await?;
    Ok(Json(json!({ "counts": counts })))
}

/// Executors and their leases
#[utoipa::path(
    get,
    path = "/v1/executors",
    tag = "overview",
    responses(
        (status = 200, description = "Every executor of `spool.executor_liveness`, live ones first.", body = ExecutorList),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
pub async fn executors(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let executors = overview::executors(&client).await?;
    Ok(Json(json!({ "executors": executors })))
}

/// Queue depth, the busiest keys and the runs nobody can execute
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "overview",
    responses(
        (status = 200, description = "Unfinished work per queue, the 100 concurrency keys waiting longest and up to 100 runs no live executor can execute, with the reason.", body = QueueOverview),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
pub async fn queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    Ok(Json(
        overview::queues(&client, MAX_KEYS, MAX_UNRUNNABLE).await?,
    ))
}
