//! Section 10 — the HTTP edge at scale:
//! - 10a: 10,000 idle attachers across 10 runs on one process: all served, no `unavailable`, how
//!   many JetStream consumers, the RSS each adds; then the runs end in Postgres and every
//!   attacher must get its end;
//! - 10b: draining 5,000 no-op runs on a process that also holds 1,000 idle attachers, against
//!   the same drain without them;
//! - 10c: six concurrent `GET /v1/runs?limit=500` over runs with 1 MB inputs: the peak RSS they
//!   add and the bytes they return.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::{rss_bytes, AbortOnDrop, Bench, Db, ProcSpec, Role, SpoolProcess};
use crate::report::{Row, Target, Unit};

const RUNS: usize = 10;
const IDLE_ATTACHERS: usize = 10_000;
const DRAIN_RUNS: i64 = 5_000;
const DRAIN_ATTACHERS: usize = 1_000;

pub async fn measure(bench: &Bench) -> Vec<Row> {
    let mut rows = match idle_at_scale(bench).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed(10, "10a idle attachers at scale", &e)],
    };
    rows.push(match drain_beside_attachers(bench).await {
        Ok(row) => row,
        Err(e) => Row::failed(10, "10b drain beside idle attachers", &e),
    });
    rows.extend(match list_memory(bench).await {
        Ok(rows) => rows,
        Err(e) => vec![Row::failed(10, "10c lists over 1 MB inputs", &e)],
    });
    rows
}

/// What the idle attachers saw.
#[derive(Default)]
struct Tally {
    served: AtomicUsize,
    refused: AtomicUsize,
    unavailable: AtomicUsize,
    ended: AtomicUsize,
}

/// Attaches one client with a raw connection; counts it served once the response head says 200,
/// then reads until the end event (or the connection ends), counting `unavailable` events.
async fn attach_idle(addr: String, run_id: String, tally: Arc<Tally>) {
    let Ok(mut conn) = TcpStream::connect(&addr).await else {
        tally.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let request = format!("GET /v1/runs/{run_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    if conn.write_all(request.as_bytes()).await.is_err() {
        tally.refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    let mut served = false;
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen.extend_from_slice(&buf[..n]);
        if !served {
            if !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                continue;
            }
            if !seen.starts_with(b"HTTP/1.1 200") {
                break;
            }
            served = true;
            tally.served.fetch_add(1, Ordering::Relaxed);
        }
        let text = String::from_utf8_lossy(&seen);
        tally.unavailable.fetch_add(
            text.matches("event: unavailable").count(),
            Ordering::Relaxed,
        );
        if text.contains("event: done") {
            tally.ended.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // keep only a tail that could hold a split event name
        let keep = seen.len().saturating_sub(32);
        seen.drain(..keep);
    }
    if !served {
        tally.refused.fetch_add(1, Ordering::Relaxed);
    }
}

/// Inserts `n` runs of a workflow nobody serves: they stay queued, and attachers wait on them.
async fn held_runs(db: &Db, prefix: &str, n: usize) -> Result<Vec<String>> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    db.client
        .execute(
            "insert into spool.runs (id, workflow) select unnest($1::text[]), 'held'",
            &[&ids],
        )
        .await?;
    Ok(ids)
}

/// Attaches `per_run` idle clients to each of `ids` and waits until every one was answered.
async fn attach_many(
    api: &SpoolProcess,
    ids: &[String],
    per_run: usize,
    tally: &Arc<Tally>,
) -> Result<JoinSet<()>> {
    let addr = format!("127.0.0.1:{}", api.port);
    let mut tasks = JoinSet::new();
    let total = ids.len() * per_run;
    for (i, id) in ids.iter().cycle().take(total).enumerate() {
        tasks.spawn(attach_idle(addr.clone(), id.clone(), tally.clone()));
        if i % 500 == 499 {
            // let the server accept in step (the listen backlog is finite)
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tally.served.load(Ordering::Relaxed) + tally.refused.load(Ordering::Relaxed) < total {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "only {} of {total} attachers answered within 120 s",
                tally.served.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // poll
    }
    Ok(tasks)
}

fn api_spec(name: &str, role: Role) -> ProcSpec {
    ProcSpec::new(name, role)
        .with_nats(name)
        .env("SPOOL_MAX_ATTACHERS", "100000")
        .env("SPOOL_MAX_ATTACHERS_PER_RUN", "100000")
}

async fn consumers(bench: &Bench, stream: &str) -> Result<usize> {
    let client = async_nats::connect(&bench.nats_url).await?;
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(stream.to_uppercase())
        .await?;
    Ok(stream.info().await?.state.consumer_count)
}

async fn idle_at_scale(bench: &Bench) -> Result<Vec<Row>> {
    let db = bench.fresh_db("bench_scale").await?;
    let api = bench.start(&db, api_spec("bench_scale", Role::Api)).await?;
    let ids = held_runs(&db, "scale", RUNS).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // settle before the baseline
    let rss_before = api.rss_bytes()?;
    let tally = Arc::new(Tally::default());
    let mut tasks = attach_many(&api, &ids, IDLE_ATTACHERS / RUNS, &tally).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // every feed made its consumer
    let rss_idle = api.rss_bytes()?;
    let consumer_count = consumers(bench, "bench_scale").await?;
    let served = tally.served.load(Ordering::Relaxed);
    // The runs end in Postgres (nothing on NATS): every attacher must get the end from there.
    db.client
        .execute(
            "update spool.runs set status = 'succeeded', output = '\"held\"', started_at = now(),
                    finished_at = now() where workflow = 'held'",
            &[],
        )
        .await?;
    let ends = tokio::time::timeout(Duration::from_secs(60), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let ended = tally.ended.load(Ordering::Relaxed);
    let per = rss_idle.saturating_sub(rss_before) as f64 / served.max(1) as f64;
    Ok(vec![
        Row::new(
            10,
            format!("10a {IDLE_ATTACHERS} idle attachers on {RUNS} runs, one process: served"),
            served as f64,
            Unit::Plain(""),
        )
        .target(Target::AtLeast(IDLE_ATTACHERS as f64))
        .note(format!(
            "{} refused; before this design one client could hold 1,000 consumers and block attach",
            tally.refused.load(Ordering::Relaxed)
        )),
        Row::new(
            10,
            "10a `unavailable` events they saw",
            tally.unavailable.load(Ordering::Relaxed) as f64,
            Unit::Plain(""),
        )
        .target(Target::AtMost(0.0)),
        Row::new(
            10,
            "10a JetStream consumers while they idle",
            consumer_count as f64,
            Unit::Plain(""),
        )
        .target(Target::AtMost(RUNS as f64))
        .note("one per attached run; before: one per attacher"),
        Row::new(10, "10a RSS per idle attacher", per, Unit::Bytes)
            .target(Target::AtMost(16.0 * 1024.0))
            .note(format!(
                "{served} attachers added {:.1} MB; before: 58.6 KB per attacher at 1,000",
                rss_idle.saturating_sub(rss_before) as f64 / 1048576.0
            )),
        Row::new(
            10,
            "10a attachers that got the end once the runs ended in Postgres",
            ended as f64,
            Unit::Plain(""),
        )
        .target(Target::AtLeast(IDLE_ATTACHERS as f64))
        .note(if ends.is_err() {
            "some still waiting after 60 s"
        } else {
            "within 60 s"
        }),
    ])
}

/// Seconds from the first start to the last finish of the no-op runs, drained by one process
/// (executor and API) while `attachers` idle clients are attached to it.
async fn timed_drain(bench: &Bench, name: &str, attachers: usize) -> Result<f64> {
    let db = bench.fresh_db(name).await?;
    let p = bench.start(&db, api_spec(name, Role::Both)).await?;
    let tally = Arc::new(Tally::default());
    let _tasks = if attachers > 0 {
        let ids = held_runs(&db, "idle", RUNS).await?;
        Some(attach_many(&p, &ids, attachers / RUNS, &tally).await?)
    } else {
        None
    };
    tokio::time::sleep(Duration::from_secs(1)).await; // settle
    db.client
        .execute(
            "insert into spool.runs (workflow) select 'noop' from generate_series(1, $1::int8)",
            &[&DRAIN_RUNS],
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await; // poll
        let left: i64 = db
            .client
            .query_one(
                "select count(*) from spool.runs where workflow = 'noop' and status in ('queued', 'running')",
                &[],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{left} no-op runs still unfinished after 120 s");
        }
    }
    let secs: f64 = db
        .client
        .query_one(
            "select extract(epoch from max(finished_at) - min(started_at))::float8
               from spool.runs where workflow = 'noop'",
            &[],
        )
        .await?
        .get(0);
    p.stop().await?;
    Ok(secs)
}

async fn drain_beside_attachers(bench: &Bench) -> Result<Row> {
    let without = timed_drain(bench, "bench_drain_alone", 0).await?;
    let with = timed_drain(bench, "bench_drain_attached", DRAIN_ATTACHERS).await?;
    Ok(Row::new(
        10,
        format!("10b drain of {DRAIN_RUNS} no-op runs beside {DRAIN_ATTACHERS} idle attachers, time vs without"),
        with / without,
        Unit::Plain("×"),
    )
    .target(Target::AtMost(1.1))
    .note(format!(
        "{:.2} s vs {:.2} s; before: 2.0 s vs 1.5 s (1.33×), 31.3 s with 4,000",
        with, without
    )))
}

async fn list_memory(bench: &Bench) -> Result<Vec<Row>> {
    const BIG_RUNS: i64 = 200;
    const CLIENTS: usize = 6;
    let db = bench.fresh_db("bench_lists").await?;
    db.client
        .execute(
            "insert into spool.runs (workflow, input)
             select 'held', jsonb_build_object('pad', repeat('x', 1000000)) from generate_series(1, $1::int8)",
            &[&BIG_RUNS],
        )
        .await?;
    let api = bench
        .start(&db, ProcSpec::new("bench_lists", Role::Api))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // settle
    let mut rows = Vec::new();
    for (label, query) in [
        ("default", "limit=500"),
        ("include=input", "limit=500&include=input"),
    ] {
        let before = api.rss_bytes()?;
        let peak = Arc::new(AtomicU64::new(before));
        let sampler = tokio::spawn(sample_peak(api.pid(), peak.clone()));
        let _sampler = AbortOnDrop(sampler.abort_handle());
        let http = reqwest::Client::new();
        let url = api.url(&format!("/v1/runs?{query}"));
        let mut requests = JoinSet::new();
        for _ in 0..CLIENTS {
            let (http, url) = (http.clone(), url.clone());
            requests.spawn(async move {
                let body = http
                    .get(url)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                anyhow::Ok(body.len())
            });
        }
        let mut largest = 0;
        while let Some(r) = requests.join_next().await {
            largest = largest.max(r.context("list request")??);
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // one more sample
        let added = peak.load(Ordering::Relaxed).saturating_sub(before) as f64;
        rows.push(
            Row::new(
                10,
                format!("10c peak RSS added by {CLIENTS} concurrent lists of 500 runs with 1 MB inputs ({label})"),
                added,
                Unit::Bytes,
            )
            .target(Target::AtMost(64.0 * 1048576.0))
            .note(format!(
                "one response {:.2} MB; before: 424 MB per response, 5.6 GB peak for six",
                largest as f64 / 1e6
            )),
        );
    }
    Ok(rows)
}

async fn sample_peak(pid: u32, peak: Arc<AtomicU64>) {
    loop {
        if let Ok(rss) = rss_bytes(pid) {
            peak.fetch_max(rss, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
