//! Section 7 — Recovery.
//!
//! - SIGKILL → restart → first replayed chunk: a ticker of 10 one-chunk steps (100 ms apart) runs
//!   on executor A; a client is attached through an API-only process; A is SIGKILLed after 2
//!   steps and restarted under the same id. Measured from the restarted executor being alive
//!   (`spool.executor_liveness`, polled every 2 ms) to the attacher's first chunk after `reset`.
//! - SIGTERM → survivor resumes: a run on A, a second executor B idle; A gets SIGTERM (short
//!   grace period) and releases the run. Measured from the signal to the run running on B.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::harness::{
    executor_alive, ms, quantile, wait_for, AbortOnDrop, Bench, Db, ProcSpec, Role,
};
use crate::report::{Row, Target, Unit};
use crate::sse;

pub struct RecoveryParams {
    pub trials: usize,
    /// `SPOOL_GRACE_PERIOD_MS` of the executor that gets SIGTERM.
    pub grace_ms: u64,
}

pub async fn measure(bench: &Bench, p: &RecoveryParams) -> Vec<Row> {
    let mut rows = Vec::new();
    let figure = format!(
        "SIGKILL → restart → first replayed chunk ({} trials, median)",
        p.trials
    );
    rows.push(match kill_restart(bench, p.trials).await {
        Ok((replay, startup)) => Row::new(7, figure, quantile(&replay, 0.5), Unit::Ms)
            .target(Target::AtMost(500.0))
            .note(format!(
                "max {:.1} ms, from the restarted executor alive; process start → alive {:.0} ms",
                quantile(&replay, 1.0),
                quantile(&startup, 0.5)
            )),
        Err(e) => Row::failed(7, figure, &e),
    });
    let figure = format!("SIGTERM → survivor resumes ({} trials, median)", p.trials);
    rows.push(match term_survivor(bench, p).await {
        Ok(ms) => Row::new(7, figure, quantile(&ms, 0.5), Unit::Ms).note(format!(
            "max {:.0} ms; grace period {} ms, survivor's poll interval default",
            quantile(&ms, 1.0),
            p.grace_ms
        )),
        Err(e) => Row::failed(7, figure, &e),
    });
    rows
}

/// Per trial: ms from the restarted executor alive to the first replayed chunk, and ms from
/// spawning the process to it being alive.
async fn kill_restart(bench: &Bench, trials: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let db = bench.fresh_db("bench_kill").await?;
    let api = bench
        .start(
            &db,
            ProcSpec::new("bench-kill-api", Role::Api).with_nats("bench_kill"),
        )
        .await?;
    let executor = ProcSpec::new("bench-kill-a", Role::Worker).with_nats("bench_kill");
    let http = reqwest::Client::new();
    let (mut samples, mut startup) = (Vec::new(), Vec::new());
    for _ in 0..trials {
        let mut a = bench.start(&db, executor.clone()).await?;
        let id: String = db
            .client
            .query_one(
                r#"insert into spool.runs (workflow, input)
                   values ('ticker', '{"count": 10, "interval_ms": 100, "steps": 10}') returning id"#,
                &[],
            )
            .await?
            .get(0);
        let mut stream = sse::attach(&http, &api.url(""), &id).await?;
        // the attacher notes when the first chunk after a reset arrives
        let watcher = tokio::spawn(async move {
            let mut reset = false;
            while let Some(e) = stream.next().await? {
                match e.kind.as_str() {
                    "reset" => reset = true,
                    "chunk" if reset => return anyhow::Ok(Instant::now()),
                    _ => ensure!(!e.is_end(), "the run ended without a reset"),
                }
            }
            anyhow::bail!("stream closed before a replayed chunk")
        });
        let _abort_watcher = AbortOnDrop(watcher.abort_handle());
        wait_steps(&db, &id, 2).await?;
        a.signal(Signal::SIGKILL)?;
        a.wait_exit(Duration::from_secs(5)).await?;
        drop(a);
        let spawned = Instant::now();
        let a = bench.spawn(&db, executor.clone())?;
        let alive = wait_alive_now(&db, &executor.executor_id).await?;
        startup.push(ms(alive - spawned));
        let replayed = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .context("no replayed chunk within 10 s")???;
        samples.push(ms(replayed.saturating_duration_since(alive)));
        wait_finished(&db, &id).await?;
        a.stop().await?;
    }
    Ok((samples, startup))
}

/// Polls every 2 ms until the executor is alive; returns when it was seen alive.
async fn wait_alive_now(db: &Db, executor_id: &str) -> Result<Instant> {
    wait_for(
        "the restarted executor to be alive",
        Duration::from_secs(30),
        Duration::from_millis(2),
        || async { Ok(executor_alive(db, executor_id).await?.then(Instant::now)) },
    )
    .await
}

async fn wait_steps(db: &Db, id: &str, steps: i64) -> Result<()> {
    wait_for(
        "steps to be recorded",
        Duration::from_secs(10),
        Duration::from_millis(2),
        || async {
            let n: i64 = db
                .client
                .query_one(
                    "select count(*) from spool.operation_outputs where run_id = $1",
                    &[&id],
                )
                .await?
                .get(0);
            Ok((n >= steps).then_some(()))
        },
    )
    .await
}

async fn wait_finished(db: &Db, id: &str) -> Result<()> {
    wait_for(
        "the run to finish",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || async {
            let status: String = db
                .client
                .query_one("select status from spool.runs where id = $1", &[&id])
                .await?
                .get(0);
            ensure!(
                status != "failed" && status != "dead",
                "the run ended {status}"
            );
            Ok((status == "succeeded").then_some(()))
        },
    )
    .await
}

async fn term_survivor(bench: &Bench, p: &RecoveryParams) -> Result<Vec<f64>> {
    let db = bench.fresh_db("bench_term").await?;
    let mut samples = Vec::new();
    for trial in 1..=p.trials {
        let a_spec = ProcSpec::new(format!("bench-term-a{trial}"), Role::Worker)
            .env("SPOOL_GRACE_PERIOD_MS", p.grace_ms.to_string());
        let mut a = bench.start(&db, a_spec).await?;
        let id: String = db
            .client
            .query_one(
                r#"insert into spool.runs (workflow, input)
                   values ('ticker', '{"count": 50, "interval_ms": 50, "steps": 50}') returning id"#,
                &[],
            )
            .await?
            .get(0);
        wait_owner(&db, &id, &a.executor_id).await?;
        let b = bench
            .start(
                &db,
                ProcSpec::new(format!("bench-term-b{trial}"), Role::Worker),
            )
            .await?;
        wait_steps(&db, &id, 1).await?;
        let t0 = Instant::now();
        a.signal(Signal::SIGTERM)?;
        wait_owner(&db, &id, &b.executor_id).await?;
        samples.push(ms(t0.elapsed()));
        a.wait_exit(Duration::from_secs(15)).await?;
        // b is killed on drop; the run it holds stays in this section's database
    }
    Ok(samples)
}

/// Polls every 2 ms until `id` is running on `executor_id`.
async fn wait_owner(db: &Db, id: &str, executor_id: &str) -> Result<()> {
    wait_for("the run to be running on its executor", Duration::from_secs(15), Duration::from_millis(2), || async {
        let row = db
            .client
            .query_opt(
                "select 1 from spool.runs where id = $1 and status = 'running' and executor_id = $2",
                &[&id, &executor_id],
            )
            .await?;
        Ok(row.map(|_| ()))
    })
    .await
}
