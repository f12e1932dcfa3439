use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

use spool::api::{self, AppState, AttachLimits};
use spool::executor::Metrics;
use spool::Registry;

use crate::common::TestDb;

/// Serves the API on a real listener (port 0) and returns its base URL.
pub(crate) async fn serve(db: &TestDb, token: Option<&str>) -> String {
    let state = AppState {
        pool: db.pool.clone(),
        registry: Registry::with_builtins(),
        api_token: token.map(Arc::from),
        metrics: Arc::new(Metrics::default()),
        max_body_bytes: 4096,
        live: None,
        readiness: Default::default(),
        edge: Arc::new(api::EdgePolicy::loopback()),
        attach: Arc::new(AttachLimits::new(10, 10, Duration::from_secs(15))),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    format!("http://{addr}")
}

async fn post(base: &str, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str) -> (StatusCode, Value) {
    let res = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = res.status();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_enqueue_nothing() {
    let db = TestDb::new().await;
    let base = serve(&db, None).await;

    let (s, b) = post(&base, "/v1/runs", "{not json").await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "malformed_json"));

    let (s, b) = post(
        &base,
        "/v1/runs",
        r#"{"workflow": "noop", "colour": "red"}"#,
    )
    .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    assert!(b["error"]["message"].as_str().unwrap().contains("colour"));

    let (s, b) = post(&base, "/v1/runs", r#"{"workflow": "nope"}"#).await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "unknown_workflow")
    );
    let m = b["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("noop") && m.contains("ticker"),
        "names the known workflows: {m}"
    );

    let big = json!({"workflow": "noop", "input": {"pad": "x".repeat(10_000)}}).to_string();
    let (s, b) = post(&base, "/v1/runs", big).await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    let (s, b) = post(
        &base,
        "/v1/runs",
        r#"{"workflow": "noop", "id": "bad id!"}"#,
    )
    .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_id")
    );

    let (s, b) = post(
        &base,
        "/v1/runs",
        r#"{"workflow": "noop", "priority": "high"}"#,
    )
    .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );

    let (s, b) = get(&base, "/v1/runs/bad%20id").await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_id"));
    let (s, b) = get(&base, "/v1/runs/missing").await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));
    let (s, b) = get(&base, "/v1/runs?status=bogus").await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_status")
    );
    let (s, b) = get(&base, "/v1/runs?colour=red").await;
    assert_eq!((s, code(&b)), (StatusCode::BAD_REQUEST, "invalid_query"));

    assert_eq!(db.scalar_i64("select count(*) from spool.runs").await, 0);
}

#[tokio::test]
async fn enqueue_is_idempotent_on_id() {
    let db = TestDb::new().await;
    let base = serve(&db, None).await;
    let body = r#"{"workflow": "ticker", "id": "order-42", "input": {"count": 2}, "concurrency_key": "c1"}"#;
    let (s, first) = post(&base, "/v1/runs", body).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(first["id"], "order-42");
    assert_eq!(first["status"], "queued");
    let (s, again) = post(&base, "/v1/runs", body).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["created_at"], first["created_at"]);
    let (s, b) = post(
        &base,
        "/v1/runs",
        r#"{"workflow": "ticker", "id": "order-42", "input": {"count": 3}}"#,
    )
    .await;
    assert_eq!((s, code(&b)), (StatusCode::CONFLICT, "id_conflict"));
    assert_eq!(db.scalar_i64("select count(*) from spool.runs").await, 1);
}

#[tokio::test]
async fn runs_can_be_read_listed_paged_and_cancelled() {
    let db = TestDb::new().await;
    let base = serve(&db, None).await;
    for i in 0..5 {
        let (s, _) = post(
            &base,
            "/v1/runs",
            format!(r#"{{"workflow": "noop", "id": "r{i}", "delay_ms": 3600000}}"#),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, page1) = get(&base, "/v1/runs?limit=3&workflow=noop").await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = page1["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r4", "r3", "r2"]);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = get(&base, &format!("/v1/runs?limit=3&cursor={cursor}")).await;
    let ids: Vec<&str> = page2["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r1", "r0"]);
    assert!(page2["next_cursor"].is_null());

    let (s, run) = post(&base, "/v1/runs/r0/cancel", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(run["status"], "cancelled");
    let (s, b) = post(&base, "/v1/runs/r0/cancel", "").await;
    assert_eq!((s, code(&b)), (StatusCode::CONFLICT, "already_finished"));
    let (s, b) = post(&base, "/v1/runs/nope/cancel", "").await;
    assert_eq!((s, code(&b)), (StatusCode::NOT_FOUND, "not_found"));

    let (s, steps) = get(&base, "/v1/runs/r1/steps").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(steps["steps"], json!([]));
    let (s, one) = get(&base, "/v1/runs/r1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["status"], "queued");
}

#[tokio::test]
async fn a_token_guards_everything_but_health() {
    let db = TestDb::new().await;
    let base = serve(&db, Some("s3cret")).await;
    let (s, b) = get(&base, "/v1/runs").await;
    assert_eq!((s, code(&b)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let wrong = reqwest::Client::new()
        .get(format!("{base}/v1/runs"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = reqwest::Client::new()
        .get(format!("{base}/v1/runs"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    let (s, _) = get(&base, "/healthz").await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = get(&base, "/readyz").await;
    assert_eq!((s, &b["status"]), (StatusCode::OK, &json!("ready")));
}

/// Two identical `POST /v1/runs` with one id at the same moment: the second waits on the
/// first's uncommitted row, and must then answer 200 with the run (it used to read its old
/// snapshot, find nothing and answer 500).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_identical_posts_with_one_id_at_once_both_succeed() {
    let db = TestDb::new().await;
    let base = serve(&db, None).await;
    // The first request's insert, not yet committed.
    let first = spool::db::connect_dedicated(&db.target, "first-post", None)
        .await
        .unwrap();
    first
        .client
        .batch_execute(
            "begin; insert into spool.runs (id, workflow, input) values ('same', 'noop', '{\"n\": 1}');",
        )
        .await
        .unwrap();
    let second = {
        let base = base.clone();
        tokio::spawn(async move {
            post(
                &base,
                "/v1/runs",
                r#"{"id": "same", "workflow": "noop", "input": {"n": 1}}"#,
            )
            .await
        })
    };
    crate::common::wait_until(
        "the second insert to wait on the first",
        Duration::from_secs(10),
        || {
            let db = &db;
            async move {
                (db.scalar_i64(
                    "select count(*) from pg_stat_activity
                      where wait_event_type = 'Lock' and query like '%insert into spool.runs%'",
                )
                .await
                    > 0)
                .then_some(())
            }
        },
    )
    .await;
    first.client.batch_execute("commit").await.unwrap();
    let (status, body) = second.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "same");
}

#[tokio::test]
async fn an_http_enqueue_may_ask_to_replace_its_keys_work() {
    let db = TestDb::new().await;
    let base = serve(&db, None).await;
    let (s, _) = post(
        &base,
        "/v1/runs",
        r#"{"id": "old", "workflow": "noop", "concurrency_key": "k"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, b) = post(
        &base,
        "/v1/runs",
        r#"{"id": "new", "workflow": "noop", "concurrency_key": "k", "key_policy": "replace"}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (_, old) = get(&base, "/v1/runs/old").await;
    assert_eq!(
        (old["status"].as_str(), old["error"]["code"].as_str()),
        (Some("cancelled"), Some("replaced"))
    );
    let (s, b) = post(
        &base,
        "/v1/runs",
        r#"{"workflow": "noop", "concurrency_key": "k", "key_policy": "evict"}"#,
    )
    .await;
    assert_eq!(
        (s, code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_key_policy")
    );
}
