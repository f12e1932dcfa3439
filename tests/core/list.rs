//! Listing runs whose values are large: bounded by bytes as well as rows, nothing skipped or
//! repeated across pages.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::Value;

use crate::api::serve;
use crate::common::TestDb;

const MB: usize = 1_000_000;

async fn page(base: &str, query: &str) -> (usize, Value) {
    let res = reqwest::get(format!("{base}/v1/runs?{query}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "{query}");
    let body = res.bytes().await.unwrap();
    (body.len(), serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_over_megabyte_inputs_stay_small_and_page_through_every_run_once() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input)
         select 'big-' || i, 'noop', jsonb_build_object('pad', repeat('x', {MB})) from generate_series(1, 40) i;
         insert into spool.runs (id, workflow, input)
         select 'small-' || i, 'noop', '{{\"n\": 1}}' from generate_series(1, 5) i"
    ))
    .await;
    let base = serve(&db, None).await;

    // Without asking, large values are left out and named with their size.
    let (bytes, body) = page(&base, "limit=500").await;
    assert!(bytes < 100_000, "a list of 45 runs took {bytes} bytes");
    let runs = body["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 45);
    for run in runs {
        let id = run["id"].as_str().unwrap();
        if id.starts_with("big-") {
            assert_eq!(run["input"], Value::Null, "{id}");
            assert!(
                run["omitted"]["input"].as_i64().unwrap() > MB as i64,
                "{run}"
            );
        } else {
            assert_eq!(run["input"], serde_json::json!({"n": 1}), "{id}");
            assert!(run.get("omitted").is_none(), "{run}");
        }
    }
    assert_eq!(body["next_cursor"], Value::Null);

    // Asked for, values come whole, and pages stop at a few megabytes; paging continues.
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=500&include=input&cursor={c}"),
            None => "limit=500&include=input".to_string(),
        };
        let (bytes, body) = page(&base, &query).await;
        assert!(bytes <= 6 * MB, "one page took {bytes} bytes");
        pages += 1;
        for run in body["runs"].as_array().unwrap() {
            let id = run["id"].as_str().unwrap().to_string();
            if id.starts_with("big-") {
                assert_eq!(run["input"]["pad"].as_str().unwrap().len(), MB);
            }
            assert!(seen.insert(id.clone()), "{id} listed twice");
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 45, "every run listed once");
    assert!(pages >= 8, "40 MB of inputs came in {pages} pages");

    let res = reqwest::get(format!("{base}/v1/runs?include=secrets"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
}
