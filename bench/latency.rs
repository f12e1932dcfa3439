//! Section 5 — Enqueue → start on an idle system: one `noop` run inserted by SQL at a time, the
//! next only after the previous one finished. The latency is `started_at − created_at`, both taken
//! by the database (`now()` of the insert's and of the claim's transaction), so the bench's polling
//! adds nothing to it. Measured with 1, 2 and 4 idle executors (a fresh database each): every one
//! is woken by the insert and claims, and one of them gets the run.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{quantile, wait_for, Bench, ProcSpec, Role};
use crate::report::{Row, Target, Unit};

/// Runs before the measured ones (connections, prepared statements, caches).
const WARM_UP: usize = 20;

pub async fn measure(bench: &Bench, runs: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    for executors in [1, 2, 4] {
        let who = if executors == 1 {
            String::new()
        } else {
            format!(", {executors} executors")
        };
        match enqueue_to_start(bench, runs, executors).await {
            Ok(ms) => rows.extend([
                Row::new(
                    5,
                    format!("enqueue → start p50{who}, {runs} sequential runs"),
                    quantile(&ms, 0.5),
                    Unit::Ms,
                )
                .target(Target::AtMost(2.0)),
                Row::new(
                    5,
                    format!("enqueue → start p99{who}"),
                    quantile(&ms, 0.99),
                    Unit::Ms,
                )
                .target(Target::AtMost(10.0))
                .note(format!("max {:.1} ms", quantile(&ms, 1.0))),
            ]),
            Err(e) => rows.push(Row::failed(5, format!("enqueue → start{who}"), &e)),
        }
    }
    rows
}

/// Latencies in ms of `runs` sequential runs on `executors` idle executors (after a warm-up).
async fn enqueue_to_start(bench: &Bench, runs: usize, executors: usize) -> Result<Vec<f64>> {
    let db = bench
        .fresh_db(&format!("bench_latency_{executors}"))
        .await?;
    let mut procs = Vec::new();
    for i in 1..=executors {
        procs.push(
            bench
                .start(
                    &db,
                    ProcSpec::new(format!("bench-latency-{i}"), Role::Worker),
                )
                .await?,
        );
    }
    let insert = db
        .client
        .prepare("insert into spool.runs (workflow) values ('noop') returning id")
        .await?;
    let finished = db
        .client
        .prepare("select finished_at is not null from spool.runs where id = $1")
        .await?;
    let mut ids = Vec::with_capacity(runs);
    for i in 0..WARM_UP + runs {
        let id: String = db.client.query_one(&insert, &[]).await?.get(0);
        // poll gently: the system should stay idle while the next run starts
        tokio::time::sleep(Duration::from_millis(3)).await;
        wait_for(
            "a no-op run to finish",
            Duration::from_secs(10),
            Duration::from_millis(2),
            || async {
                let done: bool = db.client.query_one(&finished, &[&id]).await?.get(0);
                Ok(done.then_some(()))
            },
        )
        .await?;
        if i >= WARM_UP {
            ids.push(id);
        }
    }
    let rows = db
        .client
        .query(
            "select extract(epoch from started_at - created_at)::float8 * 1000
               from spool.runs where id = any($1)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, f64>(0)).collect())
}
