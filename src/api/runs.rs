//! `/v1/runs` handlers: enqueue (idempotent on id), show, list, steps, cancel.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::db::runs::{self, NewRun, Run, RunFilter};
use crate::db::{executors, steps};
use crate::validate;

/// Body of `POST /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    workflow: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    concurrency_key: Option<String>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    run_at: Option<DateTime<Utc>>,
    #[serde(default)]
    delay_ms: Option<i64>,
    #[serde(default)]
    max_attempts: Option<i32>,
    /// `queue` (the default) or `replace` (see `spool.runs.key_policy`).
    #[serde(default)]
    key_policy: Option<String>,
}

pub async fn enqueue(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is larger than {} bytes", state.max_body_bytes),
            )
        } else {
            ApiError::bad_request("bad_body", "cannot read the request body")
        }
    })?;
    let req: EnqueueRequest = serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::unprocessable("invalid_request", e.to_string())
        }
        _ => ApiError::bad_request(
            "malformed_json",
            format!("request body is not valid JSON: {e}"),
        ),
    })?;
    let new = validate_enqueue(&state, req).await?;
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let (run, created) = runs::insert_run(&client, &new).await?;
    if created {
        return Ok((StatusCode::CREATED, Json(run)).into_response());
    }
    if same_request(&run, &new) {
        Ok((StatusCode::OK, Json(run)).into_response())
    } else {
        Err(ApiError::conflict(
            "id_conflict",
            format!("a different run with id {:?} already exists", run.id),
        ))
    }
}

async fn validate_enqueue(state: &AppState, req: EnqueueRequest) -> Result<NewRun, ApiError> {
    if let Some(id) = &req.id {
        validate::run_id(id).map_err(|m| ApiError::unprocessable("invalid_id", m))?;
    }
    if let Some(q) = &req.queue {
        validate::name("queue", q).map_err(|m| ApiError::unprocessable("invalid_queue", m))?;
    }
    if let Some(k) = &req.concurrency_key {
        validate::concurrency_key(k)
            .map_err(|m| ApiError::unprocessable("invalid_concurrency_key", m))?;
    }
    if let Some(m) = req.max_attempts {
        if !(1..=1000).contains(&m) {
            return Err(ApiError::unprocessable(
                "invalid_max_attempts",
                "max_attempts must be between 1 and 1000",
            ));
        }
    }
    if req.run_at.is_some() && req.delay_ms.is_some() {
        return Err(ApiError::unprocessable(
            "invalid_schedule",
            "give run_at or delay_ms, not both",
        ));
    }
    if let Some(d) = req.delay_ms {
        if !(0..=10 * 365 * 24 * 3600 * 1000).contains(&d) {
            return Err(ApiError::unprocessable(
                "invalid_schedule",
                "delay_ms must be between 0 and ten years",
            ));
        }
    }
    if let Some(p) = &req.key_policy {
        if !matches!(p.as_str(), "queue" | "replace") {
            return Err(ApiError::unprocessable(
                "invalid_key_policy",
                format!("key_policy must be queue or replace, not {p:?}"),
            ));
        }
    }
    let input = req.input.unwrap_or_else(|| json!({}));
    if state.registry.get(&req.workflow).is_none() {
        let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
        let mut known = executors::live_workflows(&client).await?;
        if !known.contains(&req.workflow) {
            known.extend(state.registry.names());
            known.sort();
            known.dedup();
            return Err(ApiError::unprocessable(
                "unknown_workflow",
                format!(
                    "unknown workflow {:?}; known workflows: {}",
                    req.workflow,
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(NewRun {
        id: req.id,
        workflow: req.workflow,
        input,
        queue: req.queue,
        concurrency_key: req.concurrency_key,
        priority: req.priority,
        max_attempts: req.max_attempts,
        delay_ms: req.delay_ms,
        run_at: req.run_at,
        key_policy: req.key_policy,
    })
}

/// Same id, same request? (`run_at`/`delay_ms` are not compared: a retried request computes a
/// new one.)
fn same_request(run: &Run, new: &NewRun) -> bool {
    run.workflow == new.workflow
        && run.input == new.input
        && run.queue == new.queue.as_deref().unwrap_or("default")
        && run.concurrency_key == new.concurrency_key
        && run.priority == new.priority.unwrap_or(0)
        && run.max_attempts == new.max_attempts.unwrap_or(5)
}

fn checked_id(id: &str) -> Result<(), ApiError> {
    validate::run_id(id).map_err(|m| ApiError::bad_request("invalid_id", m))
}

pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    checked_id(&id)?;
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    runs::get_run(&client, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no run with id {id:?}")))
}

pub async fn steps(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    checked_id(&id)?;
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    if runs::get_run(&client, &id).await?.is_none() {
        return Err(ApiError::not_found(format!("no run with id {id:?}")));
    }
    let steps = steps::load_steps(&client, &id).await?;
    Ok(Json(json!({"run_id": id, "steps": steps})))
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    checked_id(&id)?;
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let before = runs::get_run(&client, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run with id {id:?}")))?;
    if before.is_terminal() {
        return Err(ApiError::conflict(
            "already_finished",
            format!("run {id:?} already ended {}", before.status),
        ));
    }
    let run = runs::cancel_run(&client, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run with id {id:?}")))?;
    Ok(Json(run))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    workflow: Option<String>,
    queue: Option<String>,
    concurrency_key: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    /// Comma-separated: `input`, `output`, `error` in full whatever their size.
    include: Option<String>,
}

/// `input`, `output` and `error` larger than this many bytes of JSON are left out of a list
/// (named with their size in `omitted`) unless asked for with `include`.
pub const LIST_INLINE_MAX: i64 = 8 * 1024;
/// A list page stops adding runs once their values pass this many bytes (at least one run).
pub const LIST_MAX_BYTES: i64 = 4 << 20;

pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    if let Some(s) = &q.status {
        if !validate::STATUSES.contains(&s.as_str()) {
            return Err(ApiError::unprocessable(
                "invalid_status",
                format!(
                    "unknown status {s:?}; expected one of {}",
                    validate::STATUSES.join(", ")
                ),
            ));
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::unprocessable(
            "invalid_limit",
            "limit must be between 1 and 500",
        ));
    }
    let before_seq = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_cursor",
                    "cursor must be a next_cursor value from an earlier page",
                )
            })
        })
        .transpose()?;
    let mut include = [false; 3];
    for field in q.include.as_deref().unwrap_or("").split(',').map(str::trim) {
        match field {
            "" => {}
            "input" => include[0] = true,
            "output" => include[1] = true,
            "error" => include[2] = true,
            other => {
                return Err(ApiError::unprocessable(
                    "invalid_include",
                    format!("cannot include {other:?}; expected input, output or error"),
                ))
            }
        }
    }
    let filter = RunFilter {
        status: q.status,
        workflow: q.workflow,
        queue: q.queue,
        concurrency_key: q.concurrency_key,
        before_seq,
        limit,
        include,
        inline_max: LIST_INLINE_MAX,
        max_bytes: LIST_MAX_BYTES,
    };
    let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
    let (listed, more) = runs::list_runs(&client, &filter).await?;
    drop(client);
    let next_cursor = more
        .then(|| listed.last().map(|l| l.run.enqueue_seq.to_string()))
        .flatten();
    // Serialized straight from the rows: an included value is held once, not copied into a
    // second JSON tree.
    let runs = listed
        .iter()
        .map(|l| ListedRun {
            run: &l.run,
            omitted: l.omitted.iter().copied().collect(),
        })
        .collect();
    Ok(Json(ListPage { runs, next_cursor }).into_response())
}

/// A page of `GET /v1/runs`.
#[derive(Serialize)]
struct ListPage<'a> {
    runs: Vec<ListedRun<'a>>,
    /// The `cursor` of the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// A listed run: the run's fields, plus the JSON size of each value left out of it.
#[derive(Serialize)]
struct ListedRun<'a> {
    #[serde(flatten)]
    run: &'a Run,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    omitted: BTreeMap<&'static str, i64>,
}
