//! Schemas of the responses that are not serialized from a Rust type of their own: those the
//! handlers build with `json!` and those PostgreSQL builds as JSON (`crate::db::overview`).
//!
//! Nothing constructs these types; they only say what the JSON looks like, so the document can
//! describe it field by field rather than as a vague object. Their fields and the JSON can drift
//! apart without a compiler noticing: `tests/core/openapi.rs` validates real responses against
//! these schemas, with every object closed to undocumented fields, and fails when they do.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

pub use crate::api::error::{ErrorBody, ErrorDetail};
use crate::db::runs::Run;
use crate::db::steps::StepRecord;

/// A page of `GET /v1/runs`.
#[derive(ToSchema)]
pub struct RunList {
    /// Newest first.
    pub runs: Vec<ListedRun>,
    /// Pass it back as `cursor` for the next page; `null` on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// A run in a list: a [`Run`] whose `input`, `output` or `error` may be left out (`null`) and
/// named with its size in `omitted`.
pub struct ListedRun;

impl PartialSchema for ListedRun {
    fn schema() -> RefOr<Schema> {
        // the run's own schema with one more property, not an `allOf`: a closed object
        // (`additionalProperties: false`) stays closed with it
        let RefOr::T(Schema::Object(mut run)) = Run::schema() else {
            unreachable!("Run derives an object schema")
        };
        run.properties.insert(
            "omitted".to_string(),
            utoipa::openapi::Ref::from_schema_name(Omitted::name()).into(),
        );
        run.description = Some(
            "A run as `GET /v1/runs/{id}` shows it, except that an `input`, `output` or `error` \
             over 8 KiB of JSON is `null` here and named in `omitted`, unless `include` asked \
             for it."
                .to_string(),
        );
        Schema::Object(run).into()
    }
}

impl ToSchema for ListedRun {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Omitted::name().into(), Omitted::schema()));
    }
}

/// The values left out of a listed run, each with its size in bytes of JSON; present only
/// when something was left out.
#[derive(ToSchema)]
pub struct Omitted {
    #[schema(nullable = false, minimum = 0)]
    pub input: Option<i64>,
    #[schema(nullable = false, minimum = 0)]
    pub output: Option<i64>,
    #[schema(nullable = false, minimum = 0)]
    pub error: Option<i64>,
}

/// A value that `include` asks for in full, whatever its size.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum IncludeField {
    Input,
    Output,
    Error,
}

/// `GET /v1/runs/{id}/steps`.
#[derive(ToSchema)]
pub struct StepList {
    pub run_id: String,
    /// In step order.
    pub steps: Vec<StepRecord>,
}

/// `GET /v1/counts`.
#[derive(ToSchema)]
pub struct CountsResponse {
    pub counts: StatusCounts,
}

/// Runs per status; every status is present.
#[derive(ToSchema)]
pub struct StatusCounts {
    #[schema(minimum = 0)]
    pub queued: i64,
    #[schema(minimum = 0)]
    pub running: i64,
    #[schema(minimum = 0)]
    pub succeeded: i64,
    #[schema(minimum = 0)]
    pub failed: i64,
    #[schema(minimum = 0)]
    pub cancelled: i64,
    #[schema(minimum = 0)]
    pub dead: i64,
}

/// `GET /v1/executors`.
#[derive(ToSchema)]
pub struct ExecutorList {
    /// Live ones first, then by id.
    pub executors: Vec<ExecutorInfo>,
}

/// One executor of `spool.executor_liveness`.
#[derive(ToSchema)]
pub struct ExecutorInfo {
    pub id: String,
    /// Which boot of this id (each start increments it).
    pub incarnation: i64,
    /// It holds its lock and its lease has not expired.
    pub alive: bool,
    /// Its lock connection is connected.
    pub lock_held: bool,
    /// Runs it owns that are running.
    #[schema(minimum = 0)]
    pub running: i64,
    /// Workflows it can execute.
    pub workflows: Vec<String>,
    /// Queues it serves; `null`: all.
    #[schema(required = true)]
    pub queues: Option<Vec<String>>,
    /// The database's time of its last lease renewal.
    pub heartbeat_at: DateTime<Utc>,
    /// Its lease (`SPOOL_LEASE_MS`).
    pub lease_ms: i32,
    pub lease_expires_at: DateTime<Utc>,
    /// When live executors adopt its running runs if it is not alive by then; `null`: never.
    #[schema(required = true)]
    pub takeover_at: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    /// When it stopped gracefully; `null` while it runs, or after a crash.
    #[schema(required = true)]
    pub stopped_at: Option<DateTime<Utc>>,
    /// Milliseconds since `heartbeat_at`.
    pub heartbeat_age_ms: i64,
}

/// `GET /v1/queues`.
#[derive(ToSchema)]
pub struct QueueOverview {
    /// Per queue with unfinished runs, by name.
    pub queues: Vec<QueueDepth>,
    /// The concurrency keys whose oldest queued run waits longest (at most 100).
    pub keys: Vec<KeyDepth>,
    /// Runs no live executor can execute right now (at most 100, oldest first).
    pub unrunnable: Vec<UnrunnableRun>,
}

/// Unfinished runs of one queue.
#[derive(ToSchema)]
pub struct QueueDepth {
    pub queue: String,
    /// Queued and due.
    #[schema(minimum = 0)]
    pub ready: i64,
    /// Queued with a later `run_at`.
    #[schema(minimum = 0)]
    pub scheduled: i64,
    #[schema(minimum = 0)]
    pub running: i64,
    /// Age of its oldest queued run; `null` when none is queued.
    #[schema(required = true)]
    pub oldest_queued_age_ms: Option<i64>,
}

/// Unfinished runs of one concurrency key.
#[derive(ToSchema)]
pub struct KeyDepth {
    pub queue: String,
    pub concurrency_key: String,
    #[schema(minimum = 0)]
    pub ready: i64,
    #[schema(minimum = 0)]
    pub scheduled: i64,
    #[schema(minimum = 0)]
    pub running: i64,
    /// Age of its oldest queued run; `null` when none is queued.
    #[schema(required = true)]
    pub oldest_queued_age_ms: Option<i64>,
}

/// A run of `spool.unrunnable_runs`.
#[derive(ToSchema)]
pub struct UnrunnableRun {
    pub id: String,
    pub workflow: String,
    pub queue: String,
    #[schema(value_type = crate::validate::RunStatus)]
    pub status: String,
    #[schema(required = true)]
    pub executor_id: Option<String>,
    /// Why nobody can execute it, and what would let it run.
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// `GET /healthz`.
#[derive(ToSchema)]
pub struct Healthy {
    #[schema(schema_with = ok)]
    pub status: String,
}

fn ok() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ok"]))
}

/// `GET /readyz` when ready.
#[derive(ToSchema)]
pub struct Ready {
    #[schema(schema_with = ready)]
    pub status: String,
}

fn ready() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["ready"]))
}

/// `GET /ui/session`.
#[derive(ToSchema)]
pub struct SessionState {
    /// The server has an API token: `/v1` needs it or a session.
    pub auth_required: bool,
    /// This request may use `/v1` (it carries a live session cookie, or no token is needed).
    pub signed_in: bool,
}

/// `POST /ui/session` when signed in.
#[derive(ToSchema)]
pub struct SignedIn {
    pub signed_in: bool,
}

/// The data of a key stream's `run` event: the run whose events follow.
#[derive(ToSchema)]
pub struct KeyRunFrame {
    pub run_id: String,
    pub workflow: String,
    /// The run's position in enqueue order; the first half of its events' ids.
    pub enqueue_seq: i64,
}

/// The `x-sse-events` extension of an attach operation: each event name, what it means and
/// the JSON schema of its `data:` line (one JSON value). `key_stream` adds the `run` frame.
pub fn sse_events(key_stream: bool) -> Value {
    let any_error = json!({
        "description": "the run's error: `{\"code\", \"message\", …}` as Spool writes it, or `null`"
    });
    let mut events = json!({
        "chunk": {"description": "A piece of output: the chunk as a JSON string, byte for byte what the workflow emitted.",
                  "data": {"type": "string"}},
        "reset": {"description": "The run restarted its output after a crash: clear what was shown.",
                  "data": {"type": "null"}},
        "done": {"description": "The run succeeded; the stream of this run ends.",
                 "data": {"description": "the run's output"}},
        "failed": {"description": "The run failed or died; the stream of this run ends.", "data": any_error},
        "cancelled": {"description": "The run was cancelled; the stream of this run ends.", "data": any_error},
        "unavailable": {"description": "Live output (NATS) is unreachable; the end of the run still arrives.",
                        "data": {"type": "string"}},
        "reconnect": {"description": "The server is shutting down and ends the stream: reconnect, to any server, with this event's id as Last-Event-ID.",
                      "data": {"type": "string"}},
    });
    if key_stream {
        events["run"] = json!({
            "description": "The next run of the key: its events follow.",
            "data": {"$ref": "#/components/schemas/KeyRunFrame"},
        });
    }
    events
}

/// The `x-sse-event-id` extension: the form of the `id:` of every event, which is what
/// `Last-Event-ID` takes back.
pub fn sse_event_id(key_stream: bool) -> Value {
    if key_stream {
        json!({"type": "string", "pattern": "^[0-9]+\\.[0-9]+$", "description": "`{enqueue_seq}.{id}`"})
    } else {
        json!({"type": "string", "pattern": "^[0-9]+$", "description": "a decimal, 0 to 9223372036854775807"})
    }
}
