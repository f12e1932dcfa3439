//! Section 11 — `llm.chat` against the mock provider (`spool::llm::mock`, served by the bench):
//! - 11a, 11b: one reply alone, then 100 concurrent replies of 500 tokens, each attached as it
//!   is enqueued: time to the first chunk at the attacher and to the end, next to the same
//!   requests made to the mock directly; tokens per NATS message; row writes per reply;
//! - 11c: cancel of a generating reply → the request to the model closed (the mock sees it).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::harness::{ms, quantile, wait_for, Bench, ProcSpec, Role};
use crate::report::{Row, Target, Unit};
use crate::sse;

const DEFAULT_REPLIES: usize = 100;
const TOKENS: u64 = 500;
const DELAY_MS: u64 = 2;

pub async fn measure(bench: &Bench) -> Vec<Row> {
    let mut rows = match measure_inner(bench, 1, "a").await {
        // one reply alone: only its latency
        Ok(rows) => rows.into_iter().take(2).collect(),
        Err(e) => vec![Row::failed(11, "11a llm.chat, one reply", &e)],
    };
    rows.extend(match measure_inner(bench, DEFAULT_REPLIES, "b").await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed(11, "11b llm.chat, concurrent replies", &e)],
    });
    rows
}

async fn serve_mock() -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, spool::llm::mock::router(None)).await });
    Ok(format!("http://{addr}/v1"))
}

fn model() -> String {
    format!("mock:tokens={TOKENS},delay_ms={DELAY_MS}")
}

/// (first token, end) of one streaming request made straight to the mock.
async fn direct(http: reqwest::Client, base: String, n: usize) -> Result<(f64, f64)> {
    let started = Instant::now();
    let body = json!({"model": model(), "stream": true,
                      "messages": [{"role": "user", "content": format!("direct {n}")}]});
    let response = http
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut stream = response.bytes_stream();
    let mut first = None;
    let mut seen = Vec::new();
    while let Some(bytes) = stream.next().await {
        let bytes = bytes?;
        seen.extend_from_slice(&bytes);
        if first.is_none() && seen.windows(5).any(|w| w == b"\"t1 \"") {
            first = Some(started.elapsed());
        }
    }
    let first = first.context("no token")?;
    Ok((ms(first), ms(started.elapsed())))
}

async fn row_writes(db: &crate::harness::Db) -> Result<i64> {
    db.client
        .batch_execute("select pg_stat_force_next_flush()")
        .await?;
    let row = db
        .client
        .query_one(
            "select coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::int8
               from pg_stat_user_tables
              where schemaname = 'spool' and relname in ('runs', 'operation_outputs')",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[allow(non_snake_case)]
async fn measure_inner(bench: &Bench, REPLIES: usize, tag: &str) -> Result<Vec<Row>> {
    let base = serve_mock().await?;
    let http = reqwest::Client::new();

    // The mock alone.
    let mut direct_runs = JoinSet::new();
    for n in 0..REPLIES {
        direct_runs.spawn(direct(http.clone(), base.clone(), n));
    }
    let (mut d_first, mut d_end) = (Vec::new(), Vec::new());
    while let Some(r) = direct_runs.join_next().await {
        let (f, e) = r??;
        d_first.push(f);
        d_end.push(e);
    }

    // Through Spool: enqueue by SQL and attach at once.
    let name = format!("bench_chat_{tag}");
    let db = bench.fresh_db(&name).await?;
    let spec = ProcSpec::new(&name, Role::Both)
        .with_nats(&name)
        .env("SPOOL_LLM_BASE_URL", base.clone());
    let p = bench.start(&db, spec).await?;
    let writes_before = row_writes(&db).await?;
    let db_url = bench.db_url(&db.name);
    let api = p.url("");
    let mut replies = JoinSet::new();
    for n in 0..REPLIES {
        let (db_url, api, http) = (db_url.clone(), api.clone(), http.clone());
        replies.spawn(async move {
            let client = crate::harness::connect(&db_url).await?;
            let id = format!("chat-{n}");
            let input = json!({"model": model(), "messages": [{"role": "user", "content": format!("spool {n}")}]});
            let started = Instant::now();
            client
                .execute(
                    "insert into spool.runs (id, workflow, input) values ($1, 'llm.chat', $2)",
                    &[&id, &input],
                )
                .await?;
            let mut events = sse::attach(&http, &api, &id).await?;
            let (mut first, mut chunks, mut text) = (None, 0usize, String::new());
            loop {
                let Some(e) = events.next().await? else { bail!("{id}: stream closed") };
                match e.kind.as_str() {
                    "chunk" => {
                        first.get_or_insert_with(|| started.elapsed());
                        chunks += 1;
                        text.push_str(&serde_json::from_str::<String>(&e.data)?);
                    }
                    "reset" => text.clear(),
                    "done" => break,
                    other => bail!("{id}: {other} {}", e.data),
                }
            }
            let expected: String = (1..=TOKENS).map(|i| format!("t{i} ")).collect();
            if text != expected {
                bail!("{id}: the reply did not arrive whole");
            }
            anyhow::Ok((ms(first.context("no chunk")?), ms(started.elapsed()), chunks))
        });
    }
    let (mut s_first, mut s_end, mut messages) = (Vec::new(), Vec::new(), 0usize);
    while let Some(r) = replies.join_next().await {
        let (f, e, c) = r??;
        s_first.push(f);
        s_end.push(e);
        messages += c;
    }
    // (the executor's backends report their counts when they exit)
    p.stop().await?;
    let writes = row_writes(&db).await? - writes_before;

    // Cancel while generating: until the mock sees the request closed.
    let name = format!("bench_chat_cancel_{tag}");
    let db = bench.fresh_db(&name).await?;
    let spec = ProcSpec::new(&name, Role::Both)
        .with_nats(&name)
        .env("SPOOL_LLM_BASE_URL", base.clone());
    let p = bench.start(&db, spec).await?;
    let api = p.url("");
    let mut cancel_ms = Vec::new();
    for n in 0..if tag == "a" { 0 } else { 5 } {
        let id = format!("cancel-{n}");
        let input = json!({"model": "mock:tokens=100000,delay_ms=5",
                           "messages": [{"role": "user", "content": id}]});
        db.client
            .execute(
                "insert into spool.runs (id, workflow, input) values ($1, 'llm.chat', $2)",
                &[&id, &input],
            )
            .await?;
        let mut events = sse::attach(&http, &api, &id).await?;
        events.next().await?.context("a first chunk")?;
        let closed_before = mock_disconnected(&http, &base).await?;
        let t = Instant::now();
        db.client
            .execute("select spool.cancel_run($1)", &[&id])
            .await?;
        wait_for("the mock to see the request closed", Duration::from_secs(10), Duration::from_millis(5), || {
            let (http, base) = (http.clone(), base.clone());
            async move { Ok((mock_disconnected(&http, &base).await? > closed_before).then_some(())) }
        })
        .await?;
        cancel_ms.push(ms(t.elapsed()));
    }
    p.stop().await?;

    let p50 = |v: &[f64]| quantile(v, 0.5);
    Ok(vec![
        Row::new(11, format!("11{tag} {REPLIES} concurrent replies × {TOKENS} tokens: first chunk at the attacher, p50 (p99 {:.1} ms)", quantile(&s_first, 0.99)), p50(&s_first), Unit::Ms)
            .note(format!("the mock directly: {:.1} ms; Spool adds {:.1} ms (enqueue, claim, publish, attach)", p50(&d_first), p50(&s_first) - p50(&d_first))),
        Row::new(11, format!("11{tag} end to end (enqueue → done at the attacher), p50"), p50(&s_end), Unit::Ms)
            .note(format!("the mock directly: {:.1} ms; Spool adds {:.1} ms", p50(&d_end), p50(&s_end) - p50(&d_end))),
        Row::new(11, format!("11{tag} tokens per NATS message"), (REPLIES as u64 * TOKENS) as f64 / messages.max(1) as f64, Unit::Plain(""))
            .note(format!("{messages} chunk messages for {} tokens; the first text at once, then every 50 ms or 512 bytes", REPLIES as u64 * TOKENS)),
        Row::new(11, format!("11{tag} Postgres row writes per reply"), writes as f64 / REPLIES as f64, Unit::Plain(""))
            .target(Target::AtMost(4.0))
            .note("enqueue, claim, memoized step, finish; pg_stat_user_tables"),
        Row::new(11, format!("11c cancel → request to the model closed, p50 (max {:.1} ms, 5 trials)", cancel_ms.iter().cloned().fold(0.0, f64::max)), p50(&cancel_ms), Unit::Ms)
            .target(Target::AtMost(500.0)),
    ])
}

async fn mock_disconnected(http: &reqwest::Client, base: &str) -> Result<u64> {
    let stats: Value = http
        .get(format!("{}/stats", base.trim_end_matches("/v1")))
        .send()
        .await?
        .json()
        .await?;
    stats["disconnected"].as_u64().context("stats")
}
