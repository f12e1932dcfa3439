//! Section 5 — Enqueue → start on an idle system: one `noop` run inserted by SQL at a time, the
//! next only after the previous one finished. The latency is `started_at − created_at`, both taken
//! by the database (`now()` of the insert's and of the claim's transaction), so the bench's polling
//! adds nothing to it.

use std::time::Duration;

use anyhow::Result;

use crate::harness::{quantile, wait_for, Bench, ProcSpec, Role};
use crate::report::{Row, Target, Unit};

/// Runs before the measured ones (connections, prepared statements, caches).
const WARM_UP: usize = 20;

pub async fn measure(bench: &Bench, runs: usize) -> Vec<Row> {
    match enqueue_to_start(bench, runs).await {
        Ok(ms) => vec![
            Row::new(
                5,
                format!("enqueue → start p50, {runs} sequential runs"),
                quantile(&ms, 0.5),
                Unit::Ms,
            )
            .target(Target::AtMost(2.0)),
            Row::new(5, "enqueue → start p99", quantile(&ms, 0.99), Unit::Ms)
                .target(Target::AtMost(10.0))
                .note(format!("max {:.1} ms", quantile(&ms, 1.0))),
        ],
        Err(e) => vec![Row::failed(5, "enqueue → start", &e)],
    }
}

/// Latencies in ms of `runs` sequential runs (after a warm-up).
async fn enqueue_to_start(bench: &Bench, runs: usize) -> Result<Vec<f64>> {
    let db = bench.fresh_db("bench_latency").await?;
    let _executor = bench
        .start(&db, ProcSpec::new("bench-latency", Role::Worker))
        .await?;
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
