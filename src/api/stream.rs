//! `GET /v1/runs/{id}/stream`: the SSE attach endpoint.
//!
//! # On the wire
//! Every event has an `id:` (see `crate::live::attach`), an `event:` naming its kind, and exactly
//! one `data:` line holding one JSON value, so every SSE client (a browser's `EventSource`
//! included) dispatches every event and hands back its data byte for byte:
//!
//! | event | data |
//! |---|---|
//! | `chunk` | the chunk as a JSON string: `"line one\r\nline two"`, `""` |
//! | `reset` | `null` |
//! | `done` | the run's output |
//! | `failed`, `cancelled` | the run's error (`{"code", "message"}`) or `null` |
//! | `unavailable` | a JSON string saying why live output is unavailable |
//! | `reconnect` | a JSON string; the last event of a stream the server ends while shutting down |
//!
//! Why JSON: SSE cannot carry a bare `\r` nor tell `\r\n` from `\n` (both end a line), and an
//! event with no `data:` line is dropped by browsers. A JSON string has no raw line breaks,
//! `""` is a data line like any other, and every client already has a JSON decoder. Non-ASCII
//! text stays UTF-8 (not `\u` escapes).
//!
//! Each client's response polls its own position in the run's shared feed (see
//! `crate::live::feed` and `crate::live::attach`): no task, channel or consumer per client.
//! Attachers are capped per run and in total (429 past the cap). A client that stops reading is
//! cut by the connection's write deadline (see `slow_clients`), which drops the response: server
//! memory per client stays bounded, and the client resumes with `Last-Event-ID`.
//!
//! When the server shuts down ([`AttachLimits::end_all`]), every stream ends at once with a
//! `reconnect` event whose id is that of the last event the client was handed (events still
//! buffered are not sent): the client reconnects — to another process — with that id and
//! continues with no gap and no duplicate, and the HTTP server's graceful shutdown, which waits
//! for every response to finish, is not held up by runs that go on for minutes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::error::ErrorBody;
use super::{ApiError, AppState};
use crate::db::runs;
use crate::live::attach::{self, AttachEvent};

/// Caps on attachers, and the switch that ends every attach stream when the server shuts down.
#[derive(Debug)]
pub struct AttachLimits {
    pub max_total: usize,
    pub max_per_run: usize,
    pub keep_alive: Duration,
    total: AtomicUsize,
    per_run: Mutex<HashMap<String, usize>>,
    /// Cancelled by [`AttachLimits::end_all`]: every stream, open or yet to open, ends with
    /// `reconnect`.
    pub(super) closing: CancellationToken,
}

impl AttachLimits {
    pub fn new(max_total: usize, max_per_run: usize, keep_alive: Duration) -> Self {
        Self {
            max_total,
            max_per_run,
            keep_alive,
            total: AtomicUsize::new(0),
            per_run: Mutex::new(HashMap::new()),
            closing: CancellationToken::new(),
        }
    }

    /// Ends every attach stream now (and any opened later) with `reconnect`: the server is
    /// shutting down.
    pub fn end_all(&self) {
        self.closing.cancel();
    }

    /// Attachers connected right now.
    pub fn current(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub(super) fn admit(self: &Arc<Self>, run_id: &str) -> Option<AttachGuard> {
        let mut per_run = self.per_run.lock().unwrap();
        let n = per_run.entry(run_id.to_string()).or_insert(0);
        if *n >= self.max_per_run || self.total.load(Ordering::Relaxed) >= self.max_total {
            if *n == 0 {
                per_run.remove(run_id);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(AttachGuard {
            limits: self.clone(),
            run_id: run_id.to_string(),
        })
    }
}

/// Counts one attacher while alive.
pub(super) struct AttachGuard {
    limits: Arc<AttachLimits>,
    run_id: String,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        let mut per_run = self.limits.per_run.lock().unwrap();
        if let Some(n) = per_run.get_mut(&self.run_id) {
            *n -= 1;
            if *n == 0 {
                per_run.remove(&self.run_id);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Query of the attach endpoints: `last_event_id` resumes like the `Last-Event-ID` header, for a
/// client that cannot set headers on its first request (a browser's `EventSource` after a page
/// reload).
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AttachQuery {
    /// Resumes like `Last-Event-ID`, for a client that cannot set headers (the header wins
    /// when both are given): a decimal from 0 to 9223372036854775807 (400
    /// `invalid_last_event_id`).
    #[param(pattern = "^[0-9]+$")]
    pub last_event_id: Option<String>,
}

/// Attach to a run's live output (Server-Sent Events)
///
/// Every chunk exactly once, in order, then the end event, whenever the client attaches. Every
/// event has an `id:` (send it back as `Last-Event-ID` to resume right after it), an `event:`
/// and exactly one `data:` line holding one JSON value:
///
/// | event | data |
/// |---|---|
/// | `chunk` | the chunk as a JSON string, byte for byte what the workflow emitted |
/// | `reset` | `null`: the run restarted its output after a crash; clear what was shown |
/// | `done` | the run's output |
/// | `failed`, `cancelled` | the run's error, `{"code", "message", …}`, or `null` |
/// | `unavailable` | a JSON string: live output (NATS) is unreachable; the end still arrives |
/// | `reconnect` | a JSON string: the server is shutting down and ends the stream; reconnect with this event's id |
///
/// The stream ends after `done`, `failed`, `cancelled` or `reconnect`. Idle streams get
/// keep-alive comments. The `x-sse-events` extension gives each event's data as a JSON schema.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/stream",
    tag = "live output",
    params(
        ("id" = String, Path, description = "The run's id.", pattern = "^[A-Za-z0-9_:-]{1,128}$"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, description = "Resume right after this event: the `id:` of the last event received (0: from the start). A decimal from 0 to 9223372036854775807 (400 `invalid_last_event_id`); one above every id issued yields `reset` and the whole output.", pattern = "^[0-9]+$"),
        AttachQuery,
    ),
    responses(
        (status = 200, description = "The event stream.", content_type = "text/event-stream", body = String,
            example = json!("id: 3\nevent: chunk\ndata: \"line one\\r\\nline two\"\n\nid: 9\nevent: done\ndata: {\"ticks\":5}\n\n")),
        (status = 400, description = "`invalid_id`: not a run id; `invalid_last_event_id`; `invalid_query`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no run has this id.", body = ErrorBody),
        (status = 429, description = "`too_many_attachers`: too many clients are attached to this run or to this server; try again later.", body = ErrorBody),
        (status = 500, description = "`internal`: an unexpected database error (details go to the server's log).", body = ErrorBody),
        (status = 503, description = "`unavailable`: live output is not configured on this server (no `NATS_URL`), or the database is unreachable.", body = ErrorBody),
    )
)]
pub async fn attach(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<AttachQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    crate::validate::run_id(&id).map_err(|m| ApiError::bad_request("invalid_id", m))?;
    // the header wins: a browser's EventSource sends it when it reconnects by itself
    let given = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or(""))
        .or(q.last_event_id.as_deref());
    let after = match given {
        None => 0,
        Some(v) => last_event_id(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID must be an event id from this stream (0 to 9223372036854775807)",
            )
        })?,
    };
    let run = {
        let client = state.pool.get().await.map_err(crate::db::DbError::from)?;
        runs::get_run(&client, &id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no run with id {id:?}")))?
    };
    let Some(live) = state.live.clone() else {
        return Err(ApiError::unavailable(
            "live output is not configured on this server (set NATS_URL)",
        ));
    };
    let guard = state.attach.admit(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attachers",
            "too many clients are attached; try again later",
        )
    })?;
    let events = AttachStream {
        events: Box::pin(attach::events(live, state.pool.clone(), run, after)),
        closing: Box::pin(state.attach.closing.clone().cancelled_owned()),
        last_id: after,
        ended: false,
        _guard: guard,
    };
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.attach.keep_alive))
        .into_response())
}

/// A `Last-Event-ID` this server could have issued: an event id is a JetStream stream sequence,
/// which stays far below `i64::MAX`; anything larger (or not a decimal number) cannot be one and
/// is refused. A well-formed id above the stream's last sequence is the attacher's to handle
/// (`live::attach`: `reset`, then the output from the start).
fn last_event_id(header: &str) -> Option<u64> {
    let id = header.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse::<i64>().ok().map(|id| id as u64)
}

/// A response's events: the producer's until the server shuts down, then `reconnect`.
struct AttachStream {
    events: Pin<Box<dyn Stream<Item = AttachEvent> + Send>>,
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Id of the last event handed to the client (at first, its `Last-Event-ID`): where it
    /// resumes after `reconnect`.
    last_id: u64,
    ended: bool,
    _guard: AttachGuard,
}

impl Stream for AttachStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        // shutdown first: events still buffered are left for the client's next connection
        if this.closing.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Ok(reconnect_event(this.last_id))));
        }
        match this.events.as_mut().poll_next(cx) {
            Poll::Ready(Some(e)) => {
                this.last_id = e.id;
                Poll::Ready(Some(Ok(sse_event(e))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn reconnect_event(last_id: u64) -> Event {
    Event::default()
        .id(last_id.to_string())
        .event("reconnect")
        .data(json_string(
            "the server is shutting down; reconnect with Last-Event-ID",
        ))
}

fn sse_event(e: AttachEvent) -> Event {
    let data = wire_data(&e);
    Event::default()
        .id(e.id.to_string())
        .event(e.kind)
        .data(data)
}

/// An event's `data:` line: one line of JSON (see the module docs).
pub(super) fn wire_data(e: &AttachEvent) -> String {
    match e.kind {
        "reset" => "null".to_string(),
        "done" | "failed" | "cancelled" => one_line_json(&e.data),
        // chunks and messages: the text as a JSON string
        _ => json_string(&e.data),
    }
}

pub(super) fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// The end payloads are compact JSON already (the publisher and Postgres both serialize with
/// serde_json); anything else is re-serialized, or carried as a JSON string when it is not JSON.
fn one_line_json(payload: &str) -> String {
    if payload.trim().is_empty() {
        "null".to_string()
    } else if payload.contains(['\r', '\n']) {
        match serde_json::from_str::<serde_json::Value>(payload) {
            Ok(v) => v.to_string(),
            Err(_) => json_string(payload),
        }
    } else if serde_json::from_str::<serde::de::IgnoredAny>(payload).is_ok() {
        payload.to_string()
    } else {
        json_string(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &'static str, data: &str) -> AttachEvent {
        AttachEvent {
            id: 7,
            kind,
            data: data.to_string(),
        }
    }

    #[test]
    fn a_last_event_id_is_a_decimal_between_zero_and_i64_max() {
        assert_eq!(last_event_id("0"), Some(0));
        assert_eq!(last_event_id(" 42 "), Some(42));
        assert_eq!(last_event_id("9223372036854775807"), Some(i64::MAX as u64));
        for bad in [
            "",
            "9223372036854775808",
            "18446744073709551615",
            "-1",
            "+1",
            "1e3",
            "x",
        ] {
            assert_eq!(last_event_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_event_has_one_line_of_json_data() {
        for chunk in ["a\rb", "line one\r\nline two", "", "x\n", "\n\n", "日本 🎉"] {
            let data = wire_data(&event("chunk", chunk));
            assert!(!data.contains(['\r', '\n']), "{data}");
            assert_eq!(serde_json::from_str::<String>(&data).unwrap(), chunk);
        }
        assert_eq!(wire_data(&event("chunk", "日本")), "\"日本\"");
        assert_eq!(wire_data(&event("reset", "")), "null");
        assert_eq!(wire_data(&event("done", "{\"ticks\":3}")), "{\"ticks\":3}");
        assert_eq!(wire_data(&event("done", "{\n\"a\": 1\n}")), "{\"a\":1}");
        assert_eq!(wire_data(&event("cancelled", "")), "null");
        assert_eq!(wire_data(&event("failed", "not json")), "\"not json\"");
    }
}
