//! `spool mock-llm`: an OpenAI-compatible streaming endpoint with deterministic tokens and
//! injectable faults, for tests, the demo and benchmarks.
//!
//! `POST /v1/chat/completions` with `"stream": true` answers `t1 t2 t3 …` (one token per
//! `delay_ms`), then `finish_reason` and `usage`, then `[DONE]`. The model name carries the
//! scenario: `mock` or `mock:key=value,…` with
//! - `tokens` (20), `delay_ms` (20): the reply's length and pace (`max_tokens` shortens it);
//! - `fault`: `429` (with `Retry-After: retry_after` seconds, default 1), `500`, `cut` (the stream
//!   ends after `at` tokens without `[DONE]`), `malformed` (a line that is not JSON after `at`
//!   tokens), `stall` (no more bytes after `at` tokens, the connection kept open);
//! - `times` (1): how many requests of this scenario (model and conversation) get the fault;
//!   later ones are answered normally.
//!
//! Any other model is `404 model_not_found`; with `--api-key` a wrong bearer token is `401`.
//! `GET /stats` counts requests, tokens sent, completed streams and streams the client closed early.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    /// Tokens sent, across all streams.
    tokens: AtomicU64,
    completed: AtomicU64,
    disconnected: AtomicU64,
}

#[derive(Clone)]
struct MockState {
    api_key: Option<Arc<str>>,
    /// Requests seen per scenario (model and conversation), for `times`.
    seen: Arc<Mutex<HashMap<String, u32>>>,
    stats: Arc<Stats>,
}

/// The mock's router; `api_key` makes it check `Authorization: Bearer`.
pub fn router(api_key: Option<String>) -> Router {
    let state = MockState {
        api_key: api_key.map(Arc::from),
        seen: Arc::default(),
        stats: Arc::default(),
    };
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/chat/completions", post(completions))
        .route("/stats", get(stats))
        .with_state(state)
}

/// Serves the mock until the process ends.
pub async fn serve(listen: std::net::SocketAddr, api_key: Option<String>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("mock-llm listening on http://{}/v1", listener.local_addr()?);
    axum::serve(listener, router(api_key)).await
}

async fn stats(State(s): State<MockState>) -> Json<Value> {
    Json(json!({
        "requests": s.stats.requests.load(Ordering::Relaxed),
        "tokens": s.stats.tokens.load(Ordering::Relaxed),
        "completed": s.stats.completed.load(Ordering::Relaxed),
        "disconnected": s.stats.disconnected.load(Ordering::Relaxed),
    }))
}

fn error(status: StatusCode, message: &str, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": "invalid_request_error", "code": code}})),
    )
        .into_response()
}

/// A scenario parsed from the model name.
#[derive(Debug, Clone)]
struct Scenario {
    tokens: u64,
    delay: Duration,
    fault: Option<String>,
    at: u64,
    times: u32,
    retry_after: u64,
}

fn scenario(model: &str) -> Option<Scenario> {
    let opts = match model.split_once(':') {
        None if model == "mock" => "",
        Some(("mock", opts)) => opts,
        _ => return None,
    };
    let mut s = Scenario {
        tokens: 20,
        delay: Duration::from_millis(20),
        fault: None,
        at: u64::MAX,
        times: 1,
        retry_after: 1,
    };
    for kv in opts.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=')?;
        match k {
            "tokens" => s.tokens = v.parse().ok()?,
            "delay_ms" => s.delay = Duration::from_millis(v.parse().ok()?),
            "fault" => s.fault = Some(v.to_string()),
            "at" => s.at = v.parse().ok()?,
            "times" => s.times = v.parse().ok()?,
            "retry_after" => s.retry_after = v.parse().ok()?,
            _ => return None,
        }
    }
    if s.at == u64::MAX {
        s.at = s.tokens / 2;
    }
    Some(s)
}

async fn completions(State(s): State<MockState>, headers: HeaderMap, body: Bytes) -> Response {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(key) = &s.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key) {
            return error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_api_key",
            );
        }
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body is not JSON",
            "invalid_json",
        );
    };
    let model = request["model"].as_str().unwrap_or_default().to_string();
    let Some(sc) = scenario(&model) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "model_not_found",
        );
    };
    if request["stream"] != json!(true) {
        return error(
            StatusCode::BAD_REQUEST,
            "this mock only streams",
            "stream_required",
        );
    }
    let conversation = request["messages"].to_string();
    let nth = {
        let mut seen = s.seen.lock().unwrap();
        let n = seen.entry(format!("{model}|{conversation}")).or_insert(0);
        *n += 1;
        *n
    };
    let faulty = nth <= sc.times;
    match sc.fault.as_deref() {
        Some("429") if faulty => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached; slow down.",
                "rate_limit_exceeded",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                sc.retry_after.to_string().parse().unwrap(),
            );
            return r;
        }
        Some("500") if faulty => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error while processing your request.",
                "server_error",
            )
        }
        _ => {}
    }
    let max_tokens = request["max_tokens"]
        .as_u64()
        .or_else(|| request["max_completion_tokens"].as_u64())
        .unwrap_or(u64::MAX);
    let n = sc.tokens.min(max_tokens);
    let finish = if n < sc.tokens { "length" } else { "stop" };
    let prompt_tokens = conversation.split_whitespace().count() as u64;
    let fault = if faulty { sc.fault.clone() } else { None };
    let stats = s.stats.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(4);
    tokio::spawn(async move {
        let mut guard = StreamGuard {
            stats: stats.clone(),
            done: false,
        };
        let chunk = |delta: Value, finish: Value| {
            let event = json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            });
            Bytes::from(format!("data: {event}\n\n"))
        };
        if tx
            .send(Ok(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )))
            .await
            .is_err()
        {
            return;
        }
        for i in 1..=n {
            if i > 1 || !sc.delay.is_zero() {
                tokio::time::sleep(sc.delay).await;
            }
            if i > sc.at {
                match fault.as_deref() {
                    Some("cut") => {
                        guard.done = true;
                        return; // the body ends without [DONE]
                    }
                    Some("stall") => {
                        tx.closed().await; // nothing more, until the client goes
                        return;
                    }
                    Some("malformed") => {
                        let _ = tx.send(Ok(Bytes::from("data: {\"choices\": [\n\n"))).await;
                        guard.done = true;
                        return;
                    }
                    _ => {}
                }
            }
            let token = json!({"content": format!("t{i} ")});
            if tx.send(Ok(chunk(token, Value::Null))).await.is_err() {
                return;
            }
            stats.tokens.fetch_add(1, Ordering::Relaxed);
        }
        let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": n,
                           "total_tokens": prompt_tokens + n});
        let end = chunk(json!({}), json!(finish));
        let usage = Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
                   "model": model, "choices": [], "usage": usage})
        ));
        for b in [end, usage, Bytes::from("data: [DONE]\n\n")] {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        guard.done = true;
    });
    let body = Body::from_stream(tokio_stream_from(rx));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Counts a stream as completed, or as closed early by the client.
struct StreamGuard {
    stats: Arc<Stats>,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.stats.completed
        } else {
            &self.stats.disconnected
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
