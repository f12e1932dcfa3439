//! Listing runs whose values are large: a page is bounded by bytes as well as rows, values over
//! the inline limit are left out (and sized) unless asked for, and paging continues where the
//! byte bound cut a page, through every run exactly once.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::api::serve;
use crate::common::TestDb;

const MB: usize = 1_000_000;
/// `spool::api::runs::LIST_INLINE_MAX`: larger values are left out unless included.
const INLINE_MAX: i64 = 8 * 1024;
/// `spool::api::runs::LIST_MAX_BYTES`: a page stops adding runs past this many bytes of values.
const PAGE_MAX: usize = 4 << 20;

/// One list request: the body's size and the body.
async fn page(base: &str, query: &str) -> (usize, Value) {
    let res = reqwest::get(format!("{base}/v1/runs?{query}"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "{query}");
    let body = res.bytes().await.unwrap();
    (body.len(), serde_json::from_slice(&body).unwrap())
}

/// Every page of `query` from `cursor` on, following `next_cursor` until it is null: (body
/// size, body) each.
async fn every_page(base: &str, query: &str, mut cursor: Option<String>) -> Vec<(usize, Value)> {
    let mut pages = Vec::new();
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_string(),
        };
        let (bytes, body) = page(base, &q).await;
        let next = body["next_cursor"].as_str().map(str::to_string);
        pages.push((bytes, body));
        match next {
            Some(c) => cursor = Some(c),
            None => return pages,
        }
        assert!(pages.len() < 1_000, "paging does not end");
    }
}

fn ids(body: &Value) -> Vec<String> {
    body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// The JSON size Postgres gives a run's column, which is what `omitted` reports.
async fn json_len(db: &TestDb, id: &str, column: &str) -> i64 {
    db.scalar_i64(&format!(
        "select octet_length({column}::text)::int8 from spool.runs where id = '{id}'"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_left_out_of_lists_and_named_with_their_size() {
    let db = TestDb::new().await;
    // `{"pad": "…"}` prints as 11 bytes plus the padding: one input exactly at the inline
    // limit, one a byte over it.
    let at_limit = INLINE_MAX as usize - 11;
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input)
         select 'big-' || i, 'noop', jsonb_build_object('pad', repeat('x', {MB})) from generate_series(1, 40) i;
         insert into spool.runs (id, workflow, input)
         select 'small-' || i, 'noop', '{{\"n\": 1}}' from generate_series(1, 5) i;
         insert into spool.runs (id, workflow, input) values
           ('at-limit', 'noop', jsonb_build_object('pad', repeat('y', {at_limit}))),
           ('over-limit', 'noop', jsonb_build_object('pad', repeat('y', {at_limit} + 1)));
         insert into spool.runs (id, workflow, status, started_at, finished_at, output) values
           ('big-output', 'noop', 'succeeded', now(), now(), jsonb_build_object('text', repeat('o', {MB})));
         insert into spool.runs (id, workflow, status, started_at, finished_at, error) values
           ('big-error', 'noop', 'failed', now(), now(),
            jsonb_build_object('code', 'boom', 'message', repeat('e', {MB})))"
    ))
    .await;
    assert_eq!(json_len(&db, "at-limit", "input").await, INLINE_MAX);
    let base = serve(&db, None).await;

    let (bytes, body) = page(&base, "limit=500").await;
    assert!(
        bytes < 100_000,
        "a list of 49 runs with 42 MB of values took {bytes} bytes"
    );
    let runs = body["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 49);
    assert_eq!(body["next_cursor"], Value::Null, "one page holds them all");
    for run in runs {
        let id = run["id"].as_str().unwrap();
        let omitted = |field: &str| run["omitted"][field].as_i64();
        match id {
            _ if id.starts_with("big-") && id != "big-output" && id != "big-error" => {
                assert_eq!(run["input"], Value::Null, "{id}");
                assert_eq!(omitted("input"), Some(json_len(&db, id, "input").await));
            }
            "over-limit" => {
                assert_eq!(run["input"], Value::Null, "{id}");
                assert_eq!(omitted("input"), Some(INLINE_MAX + 1));
            }
            "at-limit" => {
                assert_eq!(run["input"]["pad"].as_str().unwrap().len(), at_limit);
                assert!(run.get("omitted").is_none(), "{id}");
            }
            "big-output" => {
                assert_eq!(run["output"], Value::Null);
                assert_eq!(omitted("output"), Some(json_len(&db, id, "output").await));
                assert_eq!(run["input"], json!({}), "small values stay");
                assert_eq!(run["omitted"].as_object().unwrap().len(), 1);
            }
            "big-error" => {
                assert_eq!(run["error"], Value::Null);
                assert_eq!(omitted("error"), Some(json_len(&db, id, "error").await));
                assert_eq!(run["omitted"].as_object().unwrap().len(), 1);
            }
            _ => {
                assert_eq!(run["input"], json!({"n": 1}), "{id}");
                assert!(run.get("omitted").is_none(), "{id}");
            }
        }
    }

    // The run itself still has every value.
    let run: Value = reqwest::get(format!("{base}/v1/runs/big-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(run["input"]["pad"].as_str().unwrap().len(), MB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cut_by_bytes_continue_through_every_run_exactly_once() {
    let db = TestDb::new().await;
    // Values just under the inline limit: listed in full, so 500 of them (about 4.1 MB) pass
    // the page's byte bound and each page is cut before its row limit.
    db.exec(
        "insert into spool.runs (id, workflow, input)
         select 'r-' || i, 'noop', jsonb_build_object('i', i, 'pad', repeat('z', 8000))
           from generate_series(1, 1200) i",
    )
    .await;
    let base = serve(&db, None).await;
    let newest_first: Vec<String> = (1..=1200).rev().map(|i| format!("r-{i}")).collect();

    let (bytes, first) = page(&base, "limit=500").await;
    let first_ids = ids(&first);
    assert!(
        first_ids.len() < 500,
        "the byte bound did not cut a page of 500 runs of 8 KB ({bytes} bytes)"
    );
    assert!(bytes <= PAGE_MAX + 64 * 1024, "one page took {bytes} bytes");
    assert_eq!(first_ids[..], newest_first[..first_ids.len()]);

    // Runs enqueued while a client pages are newer than its cursor: they do not shift the pages.
    db.exec(
        "insert into spool.runs (id, workflow) select 'late-' || i, 'noop' from generate_series(1, 10) i",
    )
    .await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a cursor after a cut page");
    let mut listed = first_ids;
    let mut pages = 1;
    for (bytes, body) in every_page(&base, "limit=500", Some(cursor.to_string())).await {
        assert!(bytes <= PAGE_MAX + 64 * 1024, "one page took {bytes} bytes");
        let page_ids = ids(&body);
        assert!(!page_ids.is_empty(), "an empty page after page {pages}");
        listed.extend(page_ids);
        pages += 1;
    }
    assert_eq!(listed, newest_first, "every run once, newest first");
    assert_eq!(pages, 3, "1,200 runs of 8 KB in pages of at most 4 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn included_values_come_whole_in_pages_of_a_few_megabytes() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input)
         select 'big-' || i, 'noop', jsonb_build_object('pad', repeat('x', {MB})) from generate_series(1, 40) i;
         insert into spool.runs (id, workflow, input)
         select 'small-' || i, 'noop', '{{\"n\": 1}}' from generate_series(1, 5) i;
         insert into spool.runs (id, workflow, input)
         values ('huge', 'noop', jsonb_build_object('pad', repeat('h', {})))",
        5 * MB
    ))
    .await;
    let base = serve(&db, None).await;

    let mut seen = BTreeSet::new();
    let pages = every_page(&base, "limit=500&include=input", None).await;
    for (bytes, body) in &pages {
        let runs = body["runs"].as_array().unwrap();
        assert!(!runs.is_empty(), "an empty page");
        // A page stops once it passes 4 MiB; a run larger than that comes alone.
        if runs.len() > 1 {
            assert!(*bytes <= PAGE_MAX + 2 * MB, "one page took {bytes} bytes");
        }
        for run in runs {
            let id = run["id"].as_str().unwrap().to_string();
            assert!(run.get("omitted").is_none(), "{run:.200}");
            match id.as_str() {
                "huge" => {
                    assert_eq!(runs.len(), 1, "a run over the page bound comes alone");
                    assert_eq!(run["input"]["pad"].as_str().unwrap().len(), 5 * MB);
                }
                _ if id.starts_with("big-") => {
                    assert_eq!(run["input"]["pad"].as_str().unwrap().len(), MB)
                }
                _ => assert_eq!(run["input"], json!({"n": 1})),
            }
            assert!(seen.insert(id.clone()), "{id} listed twice");
        }
    }
    assert_eq!(seen.len(), 46, "every run listed once");
    assert!(
        pages.len() >= 9,
        "45 MB of inputs came in {} pages",
        pages.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_names_the_values_that_come_whole() {
    let db = TestDb::new().await;
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input, status, started_at, finished_at, output) values
           ('done', 'noop', jsonb_build_object('pad', repeat('i', {MB})), 'succeeded', now(), now(),
            jsonb_build_object('text', repeat('o', {MB})));
         insert into spool.runs (id, workflow, status, started_at, finished_at, error) values
           ('failed', 'noop', 'failed', now(), now(),
            jsonb_build_object('code', 'boom', 'message', repeat('e', {MB})))"
    ))
    .await;
    let base = serve(&db, None).await;

    let (_, body) = page(&base, "include=input,output,error").await;
    for run in body["runs"].as_array().unwrap() {
        assert!(run.get("omitted").is_none(), "{run:.200}");
        match run["id"].as_str().unwrap() {
            "done" => {
                assert_eq!(run["input"]["pad"].as_str().unwrap().len(), MB);
                assert_eq!(run["output"]["text"].as_str().unwrap().len(), MB);
            }
            _ => assert_eq!(run["error"]["message"].as_str().unwrap().len(), MB),
        }
    }

    // Only what is named comes whole; the rest is still left out and sized.
    let (bytes, body) = page(&base, "include=output&status=succeeded").await;
    assert!(bytes < MB + 10_000, "{bytes} bytes");
    let run = &body["runs"][0];
    assert_eq!(run["output"]["text"].as_str().unwrap().len(), MB);
    assert_eq!(run["input"], Value::Null);
    assert_eq!(
        run["omitted"],
        json!({"input": json_len(&db, "done", "input").await})
    );

    let res = reqwest::get(format!("{base}/v1/runs?include=input,secrets"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_include");
}

#[tokio::test]
async fn the_last_page_has_no_cursor_even_when_full() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.runs (id, workflow) select 'r' || i, 'noop' from generate_series(1, 6) i",
    )
    .await;
    let base = serve(&db, None).await;

    let pages = every_page(&base, "limit=3", None).await;
    let listed: Vec<Vec<String>> = pages.iter().map(|(_, b)| ids(b)).collect();
    assert_eq!(listed, [["r6", "r5", "r4"], ["r3", "r2", "r1"]]);
    let (_, body) = page(&base, "limit=6").await;
    assert_eq!(
        body["next_cursor"],
        Value::Null,
        "nothing after a full page"
    );
}
