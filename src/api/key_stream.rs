//! `GET /v1/keys/{key}/stream?queue=…`: attach to a conversation — the live output of whatever
//! runs of a concurrency key are running or start later, one after another in enqueue order.
//!
//! Each run's events (the attach protocol's: `chunk`, `reset`, the end, `unavailable`) are
//! preceded by a `run` event whose data is `{"run_id", "workflow", "enqueue_seq"}`. Every event's
//! id is `{enqueue_seq}.{stream id}` (`{enqueue_seq}.0` for the `run` event): a client that
//! reconnects with `Last-Event-ID` continues inside that run exactly where it was, then follows
//! the runs after it. Runs that ended without starting (cancelled or replaced while queued) are
//! skipped. Between runs the server looks for the next one every half second.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use deadpool_postgres::Pool;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::error::ErrorBody;
use super::stream::{json_string, wire_data, AttachGuard};
use super::{ApiError, AppState};
use crate::db::runs::{self, Run};
use crate::live::attach::{self, AttachEvent};
use crate::live::LiveOutput;

/// How often the next run of a key is looked for while none is running.
const NEXT_RUN_POLL: Duration = Duration::from_millis(500);

/// Query of `GET /v1/keys/{key}/stream`; unknown parameters are refused (400 `invalid_query`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct KeyQuery {
    /// The key's queue (400 `invalid_queue`).
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,128}$", default = "default")]
    queue: Option<String>,
    /// Resumes like `Last-Event-ID`, for a client that cannot set headers (the header wins
    /// when both are given): `{enqueue_seq}.{id}` (400 `invalid_last_event_id`).
    #[param(pattern = "^[0-9]+\\.[0-9]+$")]
    last_event_id: Option<String>,
}

/// A resumable position: the run (`enqueue_seq`) and the stream id within it.
fn parse_id(header: &str) -> Option<(i64, u64)> {
    let (run, seq) = header.trim().split_once('.')?;
    let run: i64 = run.parse().ok().filter(|r| *r >= 0)?;
    let seq: i64 = seq.parse().ok().filter(|s| *s >= 0)?;
    Some((run, seq as u64))
}

/// Attach to a conversation: the runs of a concurrency key, one after another (Server-Sent Events)
///
/// Each run of the key that starts from now on (or after the position resumed), in enqueue
/// order, is framed by a `run` event whose data is `{"run_id", "workflow", "enqueue_seq"}`,
/// followed by that run's attach events (`chunk`, `reset`, `done`, `failed`, `cancelled`,
/// `unavailable`; see `GET /v1/runs/{id}/stream`). Every event id is `{enqueue_seq}.{id}`
/// (`{enqueue_seq}.0` for `run`): reconnect with it as `Last-Event-ID` to continue exactly
/// there. Runs that ended without starting are skipped. The stream does not end by itself;
/// `reconnect` (the server is shutting down) is its last event. The `x-sse-events` extension
/// gives each event's data as a JSON schema.
#[utoipa::path(
    get,
    path = "/v1/keys/{key}/stream",
    tag = "live output",
    params(
        ("key" = String, Path, description = "The concurrency key: 1–1024 bytes.", min_length = 1, max_length = 1024),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "Resume right after this event: `{enqueue_seq}.{id}` (400 `invalid_last_event_id`).", pattern = "^[0-9]+\\.[0-9]+$"),
        KeyQuery,
    ),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream", body = String,
            example = json!("id: 12.0\nevent: run\ndata: {\"enqueue_seq\":12,\"run_id\":\"r1\",\"workflow\":\"llm.chat\"}\n\nid: 12.3\nevent: chunk\ndata: \"Hello\"\n\n")),
        (status = 400, description = "`invalid_concurrency_key`, `invalid_queue`, `invalid_last_event_id`, `invalid_query`.", body = ErrorBody),
        (status = 429, description = "`too_many_attachers`: too many clients are attached to this key or to this server; try again later.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: live output is not configured on this server (no `NATS_URL`), or the database is unreachable.", body = ErrorBody),
    )
)]
pub async fn attach_key(
    State(state): State<AppState>,
    Path(key): Path<String>,
    query: Result<Query<KeyQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    crate::validate::concurrency_key(&key)
        .map_err(|m| ApiError::bad_request("invalid_concurrency_key", m))?;
    let queue = q.queue.unwrap_or_else(|| "default".into());
    crate::validate::name("queue", &queue)
        .map_err(|m| ApiError::bad_request("invalid_queue", m))?;
    let given = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or(""))
        .or(q.last_event_id.as_deref());
    let resume = match given {
        None => None,
        Some(v) => Some(parse_id(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID must be an event id of a key stream: {enqueue_seq}.{id}",
            )
        })?),
    };
    let Some(live) = state.live.clone() else {
        return Err(ApiError::unavailable(
            "live output is not configured on this server (set NATS_URL)",
        ));
    };
    let guard = state
        .attach
        .admit(&format!("key:{queue}/{key}"))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attachers",
                "too many clients are attached; try again later",
            )
        })?;
    let start = match resume {
        Some(position) => Start::Resume(position),
        None => {
            let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
            Start::After(runs::key_follow_start(&client, &queue, &key).await?)
        }
    };
    let follower = Follower {
        live,
        pool: state.pool.clone(),
        queue,
        key,
        start: Some(start),
        last_run: 0,
        last_id: resume.map(|(r, s)| format!("{r}.{s}")).unwrap_or_default(),
        current: None,
        closing: state.attach.closing.clone(),
        ended: false,
        _guard: guard,
    };
    Ok(Sse::new(follower.events())
        .keep_alive(KeepAlive::new().interval(state.attach.keep_alive))
        .into_response())
}

type RunEvents = std::pin::Pin<Box<dyn Stream<Item = AttachEvent> + Send>>;

enum Start {
    /// Follow the runs enqueued after this `enqueue_seq`.
    After(i64),
    /// Continue inside run `enqueue_seq` after stream id `seq`, then follow.
    Resume((i64, u64)),
}

struct Follower {
    live: Arc<LiveOutput>,
    pool: Pool,
    queue: String,
    key: String,
    start: Option<Start>,
    /// `enqueue_seq` of the run followed last.
    last_run: i64,
    last_id: String,
    /// The run followed now (`enqueue_seq`) and its events.
    current: Option<(i64, RunEvents)>,
    /// The server is shutting down: the stream ends with `reconnect`.
    closing: tokio_util::sync::CancellationToken,
    ended: bool,
    _guard: AttachGuard,
}

impl Follower {
    fn events(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        futures::stream::unfold(self, |mut f| async move {
            if f.ended {
                return None;
            }
            let closing = f.closing.clone();
            let next = tokio::select! {
                biased;
                _ = closing.cancelled() => None,
                e = f.next() => Some(e),
            };
            match next {
                None => {
                    f.ended = true;
                    let event = reconnect(&f.last_id);
                    Some((Ok(event), f))
                }
                Some(None) => None,
                Some(Some(event)) => Some((Ok(event), f)),
            }
        })
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some((seq, events)) = self.current.as_mut() {
                let seq = *seq;
                match events.next().await {
                    Some(e) => {
                        let end = e.is_end();
                        let id = format!("{seq}.{}", e.id);
                        if end {
                            self.current = None;
                        }
                        self.last_id = id.clone();
                        return Some(Event::default().id(id).event(e.kind).data(wire_data(&e)));
                    }
                    None => {
                        self.current = None;
                        continue;
                    }
                }
            }
            match self.start.take() {
                Some(Start::Resume((seq, after))) => {
                    self.last_run = seq;
                    let run = self.run_at(seq).await;
                    if let Some(run) = run {
                        self.follow(run, after);
                    }
                    continue;
                }
                Some(Start::After(seq)) => self.last_run = seq,
                None => {}
            }
            match self.next_run().await {
                Some(run) => {
                    let frame = json!({
                        "run_id": run.id,
                        "workflow": run.workflow,
                        "enqueue_seq": run.enqueue_seq,
                    });
                    let id = format!("{}.0", run.enqueue_seq);
                    self.last_id = id.clone();
                    self.follow(run, 0);
                    return Some(Event::default().id(id).event("run").data(frame.to_string()));
                }
                None => tokio::time::sleep(NEXT_RUN_POLL).await, // poll for the next run
            }
        }
    }

    fn follow(&mut self, run: Run, after: u64) {
        self.last_run = run.enqueue_seq;
        let seq = run.enqueue_seq;
        let events = attach::events(self.live.clone(), self.pool.clone(), run, after);
        self.current = Some((seq, Box::pin(events)));
    }

    // (owned copies: the stream must be Send, and a Follower is not Sync)
    fn run_at(&self, seq: i64) -> impl std::future::Future<Output = Option<Run>> + Send {
        let (pool, queue, key) = (self.pool.clone(), self.queue.clone(), self.key.clone());
        async move {
            let client = pool.get().await.ok()?;
            runs::run_of_key_at(&client, &queue, &key, seq)
                .await
                .ok()
                .flatten()
        }
    }

    fn next_run(&self) -> impl std::future::Future<Output = Option<Run>> + Send {
        let (pool, queue, key) = (self.pool.clone(), self.queue.clone(), self.key.clone());
        let after = self.last_run;
        async move {
            let client = pool.get().await.ok()?;
            runs::next_started_run_of_key(&client, &queue, &key, after)
                .await
                .ok()
                .flatten()
        }
    }
}

/// The last event of a stream the server ends while shutting down: the client reconnects (to any
/// server) with its last id.
fn reconnect(last_id: &str) -> Event {
    Event::default()
        .id(last_id)
        .event("reconnect")
        .data(json_string(
            "the server is shutting down; reconnect with Last-Event-ID",
        ))
}

#[cfg(test)]
mod tests {
    use super::parse_id;

    #[test]
    fn a_key_stream_id_is_a_run_and_a_position() {
        assert_eq!(parse_id("12.0"), Some((12, 0)));
        assert_eq!(parse_id(" 7.345 "), Some((7, 345)));
        for bad in ["", "12", "12.", ".3", "-1.2", "a.b", "1.2.3"] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }
}
