//! The operator's overview: `GET /v1/counts` (runs per status), `GET /v1/executors` (liveness
//! and leases) and `GET /v1/queues` (depth and oldest age per queue and key, and the runs nobody
//! can execute with the reason). The web view polls these; so can a script.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::db::overview::{self, CountFilter};

/// Filters of `GET /v1/counts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountQuery {
    workflow: Option<String>,
    queue: Option<String>,
    concurrency_key: Option<String>,
}

/// How many concurrency keys and unrunnable runs `GET /v1/queues` lists at most.
const MAX_KEYS: i64 = 100;
const MAX_UNRUNNABLE: i64 = 100;

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

pub async fn executors(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let executors = overview::executors(&client).await?;
    Ok(Json(json!({ "executors": executors })))
}

pub async fn queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    Ok(Json(
        overview::queues(&client, MAX_KEYS, MAX_UNRUNNABLE).await?,
    ))
}
