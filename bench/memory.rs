//! Section 8a — Memory of an idle executor: a default `spool serve` (executor and HTTP API, live
//! output on), two seconds after it came up, with no work. (8b, idle attachers, is measured with
//! the attachers of section 6.)

use std::time::Duration;

use anyhow::Result;

use crate::harness::{Bench, ProcSpec, Role};
use crate::report::{Row, Target, Unit};

pub async fn measure(bench: &Bench) -> Vec<Row> {
    let figure = "8a RSS of an idle executor (spool serve: executor + API + NATS)";
    match idle_rss(bench).await {
        Ok(rss) => vec![Row::new(8, figure, rss as f64, Unit::Bytes)
            .target(Target::AtMost(40.0 * 1024.0 * 1024.0))
            .note(format!("SPOOL_CONCURRENCY {}", bench.spool.concurrency))],
        Err(e) => vec![Row::failed(8, figure, &e)],
    }
}

async fn idle_rss(bench: &Bench) -> Result<u64> {
    let db = bench.fresh_db("bench_idle").await?;
    let spec = ProcSpec::new("bench-idle", Role::Both).with_nats("bench_idle");
    let p = bench.start(&db, spec).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.rss_bytes()
}
