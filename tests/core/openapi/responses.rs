//! Real responses of every operation — successes and errors, JSON and Server-Sent Events —
//! against the document, from servers with an executor behind them.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use spool::executor::{self, ChunkSinkFactory, Metrics, RunningExecutor};
use spool::live::LiveOutput;
use spool::Registry;

use super::check::{sse_events, Checker};
use super::{client, essence, fetch_document, operation, serve};
use crate::common::nats::NatsServer;
use crate::common::{settings, wait_terminal, TestDb};

/// An executor of the `default` queue only: runs of any other queue wait (and are unrunnable).
async fn executor(db: &TestDb, chunks: ChunkSinkFactory) -> RunningExecutor {
    let mut s = settings("openapi-executor");
    s.queues = Some(vec!["default".into()]);
    let metrics = Arc::new(Metrics::default());
    let pool = db.pool.clone();
    executor::start(
        s,
        db.target.clone(),
        pool,
        Registry::with_builtins(),
        chunks,
        metrics,
    )
    .await
    .expect("executor starts")
}

fn ticker(id: &str) -> Value {
    json!({"workflow": "ticker", "id": id, "input": {"count": 3, "interval_ms": 1, "steps": 3}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_responses_match_the_documented_schemas() {
    let db = TestDb::new().await;
    let base = serve(&db, None, None).await;
    let c = Checker::new(&base, fetch_document(&base).await);
    let _executor = executor(&db, executor::discard_chunks()).await;

    // enqueue: created, the same again, another request with that id
    let run = c
        .call(201, "POST /v1/runs", "/v1/runs", Some(ticker("oa-t")))
        .await;
    assert_eq!(run["id"], "oa-t");
    c.call(200, "POST /v1/runs", "/v1/runs", Some(ticker("oa-t")))
        .await;
    let other = json!({"workflow": "noop", "id": "oa-t"});
    let e = c.call(409, "POST /v1/runs", "/v1/runs", Some(other)).await;
    assert_eq!(e["error"]["code"], "id_conflict");
    let ended = wait_terminal(&db, "oa-t", Duration::from_secs(30)).await;
    assert_eq!(ended, "succeeded");

    // a finished run and its steps
    let run = c
        .call(200, "GET /v1/runs/{id}", "/v1/runs/oa-t", None)
        .await;
    assert_eq!(run["status"], "succeeded");
    let steps = c
        .call(200, "GET /v1/runs/{id}/steps", "/v1/runs/oa-t/steps", None)
        .await;
    assert_eq!(steps["steps"].as_array().unwrap().len(), 3);

    // runs that wait: keyed with an input too large to list, and scheduled then cancelled
    let big = json!({"workflow": "noop", "id": "oa-big", "queue": "parked", "concurrency_key": "k1",
                     "input": {"pad": "x".repeat(9000)}, "priority": 3, "max_attempts": 2});
    c.call(201, "POST /v1/runs", "/v1/runs", Some(big)).await;
    let later = json!({"workflow": "noop", "id": "oa-later", "queue": "parked",
                       "delay_ms": 3_600_000, "key_policy": "queue"});
    c.call(201, "POST /v1/runs", "/v1/runs", Some(later)).await;
    let cancel = "POST /v1/runs/{id}/cancel";
    let run = c.call(200, cancel, "/v1/runs/oa-later/cancel", None).await;
    assert_eq!(run["status"], "cancelled");
    let e = c.call(409, cancel, "/v1/runs/oa-later/cancel", None).await;
    assert_eq!(e["error"]["code"], "already_finished");

    // lists: a page with a cursor and an omitted input; the same run in full
    let page = c.call(200, "GET /v1/runs", "/v1/runs?limit=2", None).await;
    assert!(page["next_cursor"].is_string(), "{page}");
    let runs = page["runs"].as_array().unwrap();
    assert!(
        runs.iter().any(|r| r["omitted"]["input"].is_u64()),
        "{page}"
    );
    let url = "/v1/runs?queue=parked&include=input,output&status=queued";
    let page = c.call(200, "GET /v1/runs", url, None).await;
    assert_eq!(
        page["runs"][0]["input"]["pad"].as_str().map(str::len),
        Some(9000)
    );

    // the overview, with something in every list
    let counts = c
        .call(200, "GET /v1/counts", "/v1/counts?queue=parked", None)
        .await;
    assert_eq!(counts["counts"]["cancelled"], 1);
    let executors = c
        .call(200, "GET /v1/executors", "/v1/executors", None)
        .await;
    assert_eq!(executors["executors"][0]["alive"], true);
    let queues = c.call(200, "GET /v1/queues", "/v1/queues", None).await;
    for list in ["queues", "keys", "unrunnable"] {
        assert!(
            !queues[list].as_array().unwrap().is_empty(),
            "{list}: {queues}"
        );
    }

    // probes, metrics, the document itself, the web view
    for (status, path) in [
        (200, "/healthz"),
        (200, "/readyz"),
        (200, "/metrics"),
        (200, "/v1/openapi.json"),
        (303, "/"),
        (303, "/ui"),
        (200, "/ui/"),
        (200, "/ui/app.js"),
        (200, "/ui/app.css"),
        (200, "/ui/session"),
    ] {
        c.call(status, &format!("GET {path}"), path, None).await;
    }
    let token = json!({"token": "anything"});
    let signed = c
        .call(200, "POST /ui/session", "/ui/session", Some(token))
        .await;
    assert_eq!(
        signed["signed_in"], true,
        "a server without a token signs anyone in"
    );
    c.call(204, "DELETE /ui/session", "/ui/session", None).await;

    // errors: each with a status its operation lists, in the one error shape
    c.call(404, "GET /v1/runs/{id}", "/v1/runs/missing", None)
        .await;
    c.call(
        400,
        "GET /v1/runs/{id}/steps",
        "/v1/runs/bad%20id/steps",
        None,
    )
    .await;
    let unknown = json!({"workflow": "nope"});
    let e = c
        .call(422, "POST /v1/runs", "/v1/runs", Some(unknown))
        .await;
    assert_eq!(e["error"]["code"], "unknown_workflow");
    let extra = json!({"workflow": "noop", "colour": 1});
    c.call(422, "POST /v1/runs", "/v1/runs", Some(extra)).await;
    c.call(422, "GET /v1/runs", "/v1/runs?limit=0", None).await;
    c.call(400, "GET /v1/counts", "/v1/counts?colour=red", None)
        .await;
    c.call(
        503,
        "GET /v1/runs/{id}/stream",
        "/v1/runs/oa-t/stream",
        None,
    )
    .await;
    let post = |ct: &str, body: String| {
        let req = client().post(format!("{base}/v1/runs"));
        req.header("content-type", ct).body(body).send()
    };
    let huge = json!({"workflow": "noop", "input": "x".repeat(70_000)}).to_string();
    for (status, res) in [
        (400, post("application/json", "{not json".into()).await),
        (415, post("text/plain", "{}".into()).await),
        (413, post("application/json", huge).await),
    ] {
        let res = res.unwrap();
        assert_eq!(res.status().as_u16(), status);
        c.check("POST", "/v1/runs", res).await;
    }
    let get = |path: &str, header: (&str, &str)| {
        client()
            .get(format!("{base}{path}"))
            .header(header.0, header.1)
            .send()
    };
    let res = get("/v1/queues", ("host", "evil.example")).await.unwrap();
    assert_eq!(res.status(), StatusCode::MISDIRECTED_REQUEST);
    c.check("GET", "/v1/queues", res).await;
    let res = get("/v1/counts", ("origin", "http://evil.example"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    c.check("GET", "/v1/counts", res).await;
}

async fn live_output(db: &TestDb, nats: &NatsServer) -> Arc<LiveOutput> {
    let mut settings = spool::live::LiveSettings::new(nats.url());
    settings.stream = format!("S_{}", db.name);
    settings.subject_prefix = format!("out_{}", db.name);
    let live = LiveOutput::connect(settings, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    crate::common::wait_until("the stream to exist", Duration::from_secs(20), || async {
        live.ensure_stream().await.ok().map(|_| ())
    })
    .await;
    live
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_output_is_the_documented_event_stream() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    let base = serve(&db, None, Some(live.clone())).await;
    let c = Checker::new(&base, fetch_document(&base).await);
    let _executor = executor(&db, spool::live::publisher::factory(live)).await;

    c.call(201, "POST /v1/runs", "/v1/runs", Some(ticker("oa-t")))
        .await;
    let later = json!({"workflow": "noop", "id": "oa-later", "queue": "parked"});
    c.call(201, "POST /v1/runs", "/v1/runs", Some(later)).await;
    let cancel = "POST /v1/runs/{id}/cancel";
    c.call(200, cancel, "/v1/runs/oa-later/cancel", None).await;
    let ended = wait_terminal(&db, "oa-t", Duration::from_secs(30)).await;
    assert_eq!(ended, "succeeded");

    // a finished run's stream: its chunks and its end, every event as documented
    let op = operation(&c.doc, "GET", "/v1/runs/{id}/stream").clone();
    for (run, chunks, end) in [("oa-t", 3, "done"), ("oa-later", 0, "cancelled")] {
        let res = client()
            .get(format!("{base}/v1/runs/{run}/stream"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(essence(&res), "text/event-stream");
        let media = &op["responses"]["200"]["content"][essence(&res)];
        assert!(media.is_object(), "the document lists text/event-stream");
        let read = tokio::time::timeout(Duration::from_secs(30), res.text());
        let text = read.await.expect("the stream ends").unwrap();
        let events = sse_events(&text);
        assert_eq!(events.last().map(|e| e.1.as_str()), Some(end), "{text}");
        let chunk_count = events.iter().filter(|e| e.1 == "chunk").count();
        assert_eq!(chunk_count, chunks, "{text}");
        for (id, event, data) in &events {
            let what = format!("{run}: event {event}");
            let spec = &op["x-sse-events"][event];
            assert!(spec.is_object(), "{what} is not documented");
            let data: Value = serde_json::from_str(data).unwrap();
            c.validate(&what, &spec["data"], &data);
            c.validate(&format!("{what}: id"), &op["x-sse-event-id"], &json!(id));
        }
    }
    let path = "/v1/runs/oa-t/stream";
    let res = client()
        .get(format!("{base}{path}"))
        .header("last-event-id", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    c.check("GET", "/v1/runs/{id}/stream", res).await;

    // a conversation's stream: a run of the key framed by `run`, then its events
    let mut res = client()
        .get(format!("{base}/v1/keys/k2/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let op = operation(&c.doc, "GET", "/v1/keys/{key}/stream").clone();
    let media = &op["responses"]["200"]["content"][essence(&res)];
    assert!(media.is_object(), "{}", essence(&res));
    let mut keyed = ticker("oa-keyed");
    keyed["concurrency_key"] = json!("k2");
    c.call(201, "POST /v1/runs", "/v1/runs", Some(keyed)).await;
    let mut text = String::new();
    let events = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let events = sse_events(&text);
            if events.iter().any(|e| e.1 == "done") {
                return events;
            }
            let chunk = res.chunk().await.unwrap().expect("the stream goes on");
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await
    .expect("the keyed run's end arrives");
    let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names, ["run", "chunk", "chunk", "chunk", "done"]);
    for (id, event, data) in &events {
        let what = format!("key stream: event {event}");
        let spec = &op["x-sse-events"][event];
        assert!(spec.is_object(), "{what} is not documented");
        let data: Value = serde_json::from_str(data).unwrap();
        c.validate(&what, &spec["data"], &data);
        c.validate(&format!("{what}: id"), &op["x-sse-event-id"], &json!(id));
    }
}
