//! The attach protocol on the wire: chunks round-trip byte for byte to an SSE client nobody here
//! wrote (the npm `eventsource` package, installed by `scripts/test.sh`), and a `Last-Event-ID`
//! that cannot exist is refused or restarts the output — never a hang.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use spool::api::{self, AppState, AttachLimits};
use spool::executor::{self, Metrics, RunningExecutor};
use spool::live::publisher;
use spool::{Registry, RunContext, WorkflowError};

use crate::common::nats::NatsServer;
use crate::common::{settings, wait_terminal, TestDb};
use crate::in_process::live_output;

/// Chunks no SSE encoding may bend: bare CR, CRLF, empty, trailing and lone newlines,
/// multi-line, non-ASCII.
const AWKWARD: [&str; 7] = [
    "a\rb",
    "line one\r\nline two",
    "",
    "x\n",
    "\n\n",
    "multi\nline\ntext",
    "héllo ✓ 日本 🎉",
];

#[derive(Deserialize)]
struct Echo {
    chunks: Vec<String>,
}

/// An executor whose `echo` workflow emits its input's chunks, publishing to `nats`, and the
/// HTTP API on a real listener. Returns the API's base URL.
async fn echo_server(db: &TestDb, nats: &NatsServer) -> (String, RunningExecutor) {
    let live = live_output(db, nats).await;
    let mut registry = Registry::with_builtins();
    registry.register("echo", |ctx: RunContext, input: Echo| async move {
        for chunk in &input.chunks {
            ctx.emit(chunk.clone()).await;
        }
        Ok::<_, WorkflowError>(json!({"chunks": input.chunks.len()}))
    });
    let metrics = Arc::new(Metrics::default());
    let executor = executor::start(
        settings("echo"),
        db.target.clone(),
        db.pool.clone(),
        registry.clone(),
        publisher::factory(live.clone()),
        metrics.clone(),
    )
    .await
    .expect("executor starts");
    let state = AppState {
        pool: db.pool.clone(),
        registry,
        api_token: None,
        metrics,
        max_body_bytes: 1 << 20,
        live: Some(live),
        readiness: Default::default(),
        edge: Arc::new(api::EdgePolicy::loopback()),
        attach: Arc::new(AttachLimits::new(100, 100, Duration::from_secs(15))),
    };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, api::router(state)).await });
    (base, executor)
}

/// Enqueues an `echo` run and waits for it to succeed.
async fn echo_run(db: &TestDb, id: &str, chunks: &[&str]) {
    let input = json!({ "chunks": chunks });
    db.client()
        .await
        .execute(
            "insert into spool.runs (id, workflow, input) values ($1, 'echo', $2)",
            &[&id, &input],
        )
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(db, id, Duration::from_secs(30)).await,
        "succeeded"
    );
}

/// One event as the external client printed it.
#[derive(Debug, Deserialize)]
struct Received {
    event: String,
    id: String,
    /// The data exactly as the EventSource dispatched it.
    data: String,
    /// `data` decoded as the protocol documents (JSON), or null with `error` set.
    value: Value,
    error: Option<String>,
}

/// Attaches with the npm `eventsource` client and returns what it dispatched, up to the end.
async fn attach_with_eventsource(url: &str) -> Vec<Received> {
    let packages = std::env::var("SPOOL_TEST_SSE_CLIENTS").expect(
        "SPOOL_TEST_SSE_CLIENTS is not set: run the suite with `just test`, which installs the npm `eventsource` client",
    );
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/live/eventsource_client.mjs");
    let run = tokio::process::Command::new("node")
        .arg(script)
        .arg(packages)
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the eventsource client ends in time")
        .expect("node runs");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "eventsource client failed ({}): {stderr}\nreceived so far:\n{stdout}",
        out.status
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_chunk_round_trips_byte_for_byte_to_an_eventsource_client_nobody_here_wrote() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let (base, _executor) = echo_server(&db, &nats).await;
    echo_run(&db, "awkward", &AWKWARD).await;

    let events = attach_with_eventsource(&format!("{base}/v1/runs/awkward/stream")).await;
    let chunks: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "chunk")
        .map(|e| &e.value)
        .collect();
    assert_eq!(
        chunks,
        AWKWARD.map(|c| json!(c)).iter().collect::<Vec<_>>(),
        "every chunk exactly, in order, as the external client decodes it: {events:#?}"
    );
    assert!(
        events.iter().all(|e| e.error.is_none() && !e.id.is_empty()),
        "every event's data is JSON and every event has an id: {events:#?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.event.as_str(), &last.value),
        ("done", &json!({"chunks": AWKWARD.len()})),
        "{events:#?}"
    );
    assert_eq!(
        events.len(),
        AWKWARD.len() + 1,
        "nothing but the chunks and the end: {events:#?}"
    );
    assert!(
        events.iter().all(|e| !e.data.contains(['\r', '\n'])),
        "the data of every event is one line on the wire"
    );

    // The project's own client decodes the same.
    let ours = crate::collect(&base, "awkward", None, 1000).await;
    assert_eq!(crate::chunks(&ours), AWKWARD.map(String::from));
    assert_eq!(ours.last().unwrap().event, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_event_id_that_cannot_exist_is_refused_or_restarts_the_output_never_a_hang() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let (base, _executor) = echo_server(&db, &nats).await;
    echo_run(&db, "r", &["one", "two"]).await;

    // Beyond any JetStream sequence (u64::MAX used to wrap to "from the start" or panic the
    // producer, so the client never got its end event): refused.
    for id in ["18446744073709551615", "9223372036854775808", "-1", "x"] {
        let res = reqwest::Client::new()
            .get(format!("{base}/v1/runs/r/stream"))
            .header("last-event-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "Last-Event-ID {id}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "invalid_last_event_id",
            "{id}: {body}"
        );
    }

    // A well-formed id past the end of the stream (from another stream, or a stream that was
    // recreated): the client's view is unrelated to this output, so it gets `reset` and the
    // whole output again, then the end.
    let events = tokio::time::timeout(
        Duration::from_secs(30),
        crate::collect(&base, "r", Some("9223372036854775807"), 1000),
    )
    .await
    .expect("the end event arrives");
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.event.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("reset", ""),
            ("chunk", "one"),
            ("chunk", "two"),
            ("done", "{\"chunks\":2}")
        ]
    );
}
