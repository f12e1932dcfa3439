//! Section 3 — Enqueue: `POST /v1/runs` from concurrent HTTP clients against an `--api-only`
//! process, and single-row SQL inserts from 16 clients with the insert wake-up trigger on and off.
//!
//! During the SQL inserts a connection LISTENs on the wake-up channel, as an idle executor's
//! does, so the "on" figure includes delivering the wake-ups (an executor is left out: its claims
//! would make the figure depend on the queue's backlog, not on the trigger).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::ceiling::{insert_loop, Ceiling};
use crate::harness::{Bench, Db, ProcSpec, Role};
use crate::report::format_value;
use crate::report::{Row, Target, Unit};

pub struct EnqueueParams {
    pub http_runs: usize,
    pub http_clients: usize,
    pub sql_secs: f64,
}

const SQL_CLIENTS: usize = 16;
/// Rounds of inserts with the wake-up on and off, alternating; the best of each counts.
const ROUNDS: usize = 3;
const INSERT: &str = "insert into spool.runs (workflow) values ('noop')";

pub async fn measure(bench: &Bench, p: &EnqueueParams, ceiling: &Ceiling) -> Vec<Row> {
    let mut rows = Vec::new();
    let figure = format!(
        "HTTP POST /v1/runs, {} clients, {} runs",
        p.http_clients, p.http_runs
    );
    rows.push(match http_enqueue(bench, p).await {
        Ok(rate) => Row::new(3, figure, rate, Unit::PerSec("runs"))
            .ceiling("1b 16 clients", ceiling.commits_16),
        Err(e) => Row::failed(3, figure, &e),
    });
    match sql_inserts(bench, p).await {
        Ok(SqlInserts { on, off, wakeups }) => {
            rows.push(
                Row::new(
                    3,
                    "SQL single-row inserts, 16 clients, wake-up on",
                    on,
                    Unit::PerSec("runs"),
                )
                .ceiling("1b 16 clients", ceiling.commits_16)
                .note(format!(
                    "{} delivered to a listener",
                    format_value(wakeups, Unit::PerSec("wake-ups"))
                )),
            );
            rows.push(
                Row::new(
                    3,
                    "SQL single-row inserts, 16 clients, wake-up off",
                    off,
                    Unit::PerSec("runs"),
                )
                .ceiling("1b 16 clients", ceiling.commits_16),
            );
            rows.push(
                Row::new(
                    3,
                    "cost of the insert wake-up",
                    (1.0 - on / off) * 100.0,
                    Unit::Percent,
                )
                .target(Target::AtMost(20.0))
                .note(format!("1 − on/off; best of {ROUNDS} rounds each")),
            );
        }
        Err(e) => rows.push(Row::failed(3, "SQL single-row inserts, wake-up on/off", &e)),
    }
    rows
}

/// HTTP enqueue: `http_clients` tasks share `http_runs` POSTs of a no-op run.
async fn http_enqueue(bench: &Bench, p: &EnqueueParams) -> Result<f64> {
    let db = bench.fresh_db("bench_enqueue_http").await?;
    let api = bench
        .start(&db, ProcSpec::new("bench-enqueue-api", Role::Api))
        .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(p.http_clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = api.url("/v1/runs");
    // warm-up: one request per client (connections, prepared statements)
    post_many(&client, &url, p.http_clients, p.http_clients).await?;
    let started = Instant::now();
    post_many(&client, &url, p.http_clients, p.http_runs).await?;
    let rate = p.http_runs as f64 / started.elapsed().as_secs_f64();
    let n: i64 = db
        .client
        .query_one("select count(*) from spool.runs", &[])
        .await?
        .get(0);
    ensure!(
        n as usize == p.http_runs + p.http_clients,
        "{n} runs in the table"
    );
    Ok(rate)
}

/// `total` POSTs from `clients` concurrent tasks; every answer must be 201.
async fn post_many(
    client: &reqwest::Client,
    url: &str,
    clients: usize,
    total: usize,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, next) = (client.clone(), url.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let r = client
                    .post(&url)
                    .json(&serde_json::json!({"workflow": "noop", "input": {}}))
                    .send()
                    .await?;
                ensure!(r.status() == 201, "POST /v1/runs answered {}", r.status());
                r.bytes().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

struct SqlInserts {
    /// Best inserts/s with the wake-up trigger on and off.
    on: f64,
    off: f64,
    /// Wake-ups/s the listener received in the best "on" round.
    wakeups: f64,
}

/// Single-row inserts with the wake-up trigger on, then off, `ROUNDS` times; best of each.
async fn sql_inserts(bench: &Bench, p: &EnqueueParams) -> Result<SqlInserts> {
    let db = bench.fresh_db("bench_enqueue_sql").await?;
    let listener = Listener::start(&db.url).await?;
    let secs = Duration::from_secs_f64(p.sql_secs);
    let mut best = SqlInserts {
        on: 0.0,
        off: 0.0,
        wakeups: 0.0,
    };
    for _ in 0..ROUNDS {
        set_wakeup(&db, true).await?;
        let before = listener.received();
        let started = Instant::now();
        let on = insert_loop(&db, SQL_CLIENTS, secs, INSERT).await?;
        if on > best.on {
            best.on = on;
            best.wakeups = (listener.received() - before) as f64 / started.elapsed().as_secs_f64();
        }
        set_wakeup(&db, false).await?;
        best.off = best
            .off
            .max(insert_loop(&db, SQL_CLIENTS, secs, INSERT).await?);
    }
    set_wakeup(&db, true).await?;
    Ok(best)
}

/// A connection that LISTENs on `spool_runs` and counts the notifications.
struct Listener {
    received: Arc<AtomicU64>,
    _client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    async fn start(url: &str) -> Result<Self> {
        let (client, mut conn) = tokio_postgres::connect(url, NoTls)
            .await
            .context("connect listener")?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let task = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(_) = message {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        client.batch_execute("listen spool_runs").await?;
        Ok(Self {
            received,
            _client: client,
            task,
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn set_wakeup(db: &Db, on: bool) -> Result<()> {
    let verb = if on { "enable" } else { "disable" };
    db.client
        .batch_execute(&format!(
            "alter table spool.runs {verb} trigger runs_inserted_wakeup"
        ))
        .await?;
    Ok(())
}
