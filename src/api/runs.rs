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

use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::openapi::schemas::{IncludeField, RunList, StepList};
use super::{ApiError, AppState};
use crate::db::runs::{self, NewRun, Run, RunFilter};
use crate::db::{executors, steps};
use crate::validate;

/// Body of `POST /v1/runs`. Fields not listed here are refused (422 `invalid_request`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"workflow": "ticker", "id": "order-42", "input": {"count": 3, "interval_ms": 100, "steps": 3}}))]
pub struct EnqueueRequest {
    /// A workflow this server or a live executor knows (422 `unknown_workflow` names them).
    workflow: String,
    /// The run's input, any JSON; `{}` when absent or `null`.
    #[serde(default)]
    #[schema(value_type = Value, default = json!({}))]
    input: Option<Value>,
    /// Makes the request idempotent: the same id with the same request answers 200 with the
    /// existing run, with another request 409 `id_conflict`. Default: a new UUID. 1–128
    /// letters, digits, `-`, `_`, `:` (422 `invalid_id`).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_:-]{1,128}$")]
    id: Option<String>,
    /// 1–128 letters, digits, `-`, `_`, `:`, `.` (422 `invalid_queue`).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$", default = "default")]
    queue: Option<String>,
    /// Runs with the same (queue, key) run one at a time, in enqueue order. 1–1024 bytes of
    /// UTF-8 (422 `invalid_concurrency_key`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    concurrency_key: Option<String>,
    /// Lower runs first.
    #[serde(default)]
    #[schema(default = 0)]
    priority: Option<i32>,
    /// Earliest start. Give `run_at` or `delay_ms`, not both (422 `invalid_schedule`).
    #[serde(default)]
    run_at: Option<DateTime<Utc>>,
    /// Earliest start, this many milliseconds after the database's `now()`: 0 to ten years
    /// (422 `invalid_schedule`).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 315_360_000_000_i64)]
    delay_ms: Option<i64>,
    /// Charged claims before the run ends `dead`: 1 to 1000 (422 `invalid_max_attempts`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000, default = 5)]
    max_attempts: Option<i32>,
    /// `queue` (the default) or `replace` (see `spool.runs.key_policy`).
    #[serde(default)]
    #[schema(schema_with = key_policy_schema)]
    key_policy: Option<String>,
}

fn key_policy_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some([json!("queue"), json!("replace"), Value::Null]))
        .default(Some(json!("queue")))
        .description(Some(
            "`queue` (the default) or `replace`: `replace` cancels the key's running run and its \
             earlier queued runs (422 `invalid_key_policy`).",
        ))
}

/// Enqueue a run
///
/// Idempotent on `id`: a retried request answers 200 with the run it created (`run_at` and
/// `delay_ms` are not compared, a retry computes a new one).
#[utoipa::path(
    post,
    path = "/v1/runs",
    tag = "runs",
    request_body(content = EnqueueRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The new run.", body = Run),
        (status = 200, description = "A run with this `id` and the same request already exists: that run.", body = Run),
        (status = 400, description = "`malformed_json`: the body is not JSON; `bad_body`: it could not be read.", body = ErrorBody),
        (status = 409, description = "`id_conflict`: a different run with this `id` exists.", body = ErrorBody),
        (status = 422, description = "`invalid_request` (a field unknown or of the wrong type; the message names it), `invalid_id`, `invalid_queue`, `invalid_concurrency_key`, `invalid_max_attempts`, `invalid_schedule`, `invalid_key_policy`, `unknown_workflow` (the message names the known ones), `constraint_violation` (the database refused the run; the message names the constraint).", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
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

/// A run, with every value in full
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id.", pattern = "^[A-Za-z0-9_:-]{1,128}$")),
    responses(
        (status = 200, description = "The run.", body = Run),
        (status = 400, description = "`invalid_id`: not a run id.", body = ErrorBody),
        (status = 404, description = "`not_found`: no run has this id.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
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

/// The run's memoized steps
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/steps",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id.", pattern = "^[A-Za-z0-9_:-]{1,128}$")),
    responses(
        (status = 200, description = "Its steps, in order.", body = StepList),
        (status = 400, description = "`invalid_id`: not a run id.", body = ErrorBody),
        (status = 404, description = "`not_found`: no run has this id.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
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

/// Cancel a run
///
/// A queued run ends `cancelled` at once; a running one has `cancel_requested` set and ends at
/// its next step boundary (a generation in progress stops at once).
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    tag = "runs",
    params(("id" = String, Path, description = "The run's id.", pattern = "^[A-Za-z0-9_:-]{1,128}$")),
    responses(
        (status = 200, description = "The run after the cancel.", body = Run),
        (status = 400, description = "`invalid_id`: not a run id.", body = ErrorBody),
        (status = 404, description = "`not_found`: no run has this id.", body = ErrorBody),
        (status = 409, description = "`already_finished`: the run has already ended.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
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

/// Query of `GET /v1/runs`; unknown parameters are refused (400 `invalid_query`).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only runs with this status (422 `invalid_status`).
    #[param(value_type = Option<crate::validate::RunStatus>)]
    status: Option<String>,
    /// Only runs of this workflow.
    workflow: Option<String>,
    /// Only runs of this queue.
    queue: Option<String>,
    /// Only runs of this concurrency key.
    concurrency_key: Option<String>,
    /// Runs whose id starts with this.
    id_prefix: Option<String>,
    /// Most runs on the page: 1 to 500 (422 `invalid_limit`).
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (400 `invalid_cursor`).
    cursor: Option<String>,
    /// Comma-separated: `input`, `output`, `error` in full whatever their size (422
    /// `invalid_include`).
    #[param(value_type = Option<Vec<IncludeField>>, inline, style = Form, explode = false)]
    include: Option<String>,
}

/// `input`, `output` and `error` larger than this many bytes of JSON are left out of a list
/// (named with their size in `omitted`) unless asked for with `include`.
pub const LIST_INLINE_MAX: i64 = 8 * 1024;
/// A list page stops adding runs once their values pass this many bytes (at least one run).
pub const LIST_MAX_BYTES: i64 = 4 << 20;

/// List runs, newest first
///
/// An `input`, `output` or `error` over 8 KiB of JSON is left out (`null`) and named with its
/// size in `omitted` unless `include` asks for it; a page also stops once its values pass 4 MiB
/// (at least one run). Pass `next_cursor` back as `cursor` for the next page.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of runs.", body = RunList),
        (status = 400, description = "`invalid_query`: an unknown parameter or one of the wrong type; `invalid_cursor`: not a `next_cursor`.", body = ErrorBody),
        (status = 422, description = "`invalid_status`, `invalid_limit`, `invalid_include`.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: the database is unreachable; try again.", body = ErrorBody),
    )
)]
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
        id_prefix: q.id_prefix.filter(|p| !p.is_empty()),
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
