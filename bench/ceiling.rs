//! Section 1 — The ceiling: what raw SQL does with the same work on the same cluster, in the same
//! run.
//!
//! - claim-and-complete: `spool.runs` rows with workflow `noop`, 50 per statement, locked with
//!   `FOR UPDATE SKIP LOCKED` and ended in the same statement, from 2 clients;
//! - single-row commits: one `insert into spool.runs` per transaction (no wake-up trigger), from 1
//!   and from 16 clients;
//! - claim, then finish: the two committed transitions a run makes in Spool (queued → running,
//!   running → succeeded), each one `UPDATE` of 512 rows, from 2 clients, with no fencing, no
//!   executor and no Spool process: what plain SQL does with a run kept in one row through its
//!   states, in rows/s and in WAL bytes per run. Its WAL is what those two updates cost before
//!   any code of Spool's; its rate is no bound (one statement at a time per client, where an
//!   executor overlaps claims and finishes).

use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use crate::harness::{Bench, Db};
use crate::report::{format_value, Row, Unit};

/// Rows claimed and completed per statement.
const CLAIM_BATCH: i64 = 50;
const CLAIM_CLIENTS: usize = 2;
/// A ceiling is the best of this many rounds: what the cluster can do.
const ROUNDS: usize = 2;
/// Rows per statement of 1c: Spool's claim batch when tuned.
const TWO_STEP_BATCH: i64 = 512;

/// The ceilings the Spool figures are compared with (rows/s).
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub claim_complete: f64,
    pub commits_16: f64,
}

pub struct CeilingParams {
    pub claim_rows: i64,
    pub commit_secs: f64,
}

pub async fn measure(bench: &Bench, p: &CeilingParams) -> Result<(Ceiling, Vec<Row>)> {
    let db = bench.fresh_db("bench_ceiling").await?;
    let mut claim_complete = 0f64;
    for _ in 0..ROUNDS {
        claim_complete = claim_complete.max(claim_and_complete(&db, p.claim_rows).await?);
    }
    db.client
        .batch_execute("alter table spool.runs disable trigger runs_inserted_wakeup")
        .await?;
    let secs = Duration::from_secs_f64(p.commit_secs);
    let (mut commits_1, mut commits_16) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        commits_1 = commits_1.max(single_row_commits(&db, 1, secs).await?);
        commits_16 = commits_16.max(single_row_commits(&db, 16, secs).await?);
    }
    let mut two_step = TwoStep::default();
    for _ in 0..ROUNDS {
        let t = claim_then_finish(&db, p.claim_rows).await?;
        if t.per_sec > two_step.per_sec {
            two_step = t;
        }
    }
    let c = Ceiling {
        claim_complete,
        commits_16,
    };
    let of_rows = format_value(p.claim_rows as f64, Unit::Plain(""));
    let rows = vec![
        rate(
            "1a SQL claim+complete, 50 rows/statement, 2 clients",
            claim_complete,
            format!("{of_rows} rows; best of {ROUNDS}"),
        ),
        rate(
            "1b SQL single-row insert commits, 1 client",
            commits_1,
            format!("best of {ROUNDS}"),
        ),
        rate(
            "1b SQL single-row insert commits, 16 clients",
            commits_16,
            format!("best of {ROUNDS}"),
        ),
        rate(
            "1c SQL claim, then finish: two committed updates per run, 512 rows/statement, 2 clients",
            two_step.per_sec,
            format!("{of_rows} rows; best of {ROUNDS}; 2 commits per 512 rows"),
        ),
        Row::new(
            1,
            "1c SQL claim, then finish: WAL bytes per row (insert to finish, after a checkpoint)",
            two_step.wal_per_row,
            Unit::Plain("B"),
        )
        .note(two_step.wal_top),
    ];
    Ok((c, rows))
}

/// A row of section 1 in rows/s.
fn rate(figure: &str, value: f64, note: String) -> Row {
    Row::new(1, figure, value, Unit::PerSec("rows")).note(note)
}

/// Inserts `n` queued `noop` runs in one statement (as the no-op drains do).
async fn insert_noop_runs(db: &Db, n: i64) -> Result<()> {
    db.client
        .execute(
            "insert into spool.runs (workflow) select 'noop' from generate_series(1, $1::int8)",
            &[&n],
        )
        .await?;
    Ok(())
}

/// The claim statement of 1a and 1c: locks up to `$1` queued rows in claim order and updates
/// them as a claim does, with the columns of `set` besides, then `tail`.
fn claim_sql(set: &str, tail: &str) -> String {
    format!(
        "with c as (
            select id from spool.runs
             where status = 'queued' and key_ready and run_at <= now()
             order by priority, run_at, enqueue_seq
             limit $1
             for update skip locked)
         update spool.runs r
            set {set}, executor_id = 'ceiling',
                claim_epoch = r.claim_epoch + 1, attempt = r.attempt + 1,
                started_at = now(), updated_at = now()
           from c where r.id = c.id
         {tail}"
    )
}

/// Inserts `n` queued rows into an empty `spool.runs`, then runs `drain` on 2 connections at
/// once until each returns how many rows it ended; rows/s over the drain. The rows must all end.
async fn drain_by_clients<F, Fut>(db: &Db, n: i64, drain: F) -> Result<f64>
where
    F: Fn(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<u64>> + Send + 'static,
{
    insert_noop_runs(db, n).await?;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLAIM_CLIENTS {
        clients.push(tokio::spawn(drain(db.connect().await?)));
    }
    let mut total = 0;
    for c in clients {
        total += c.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(total as i64 == n, "ended {total} of {n} rows");
    Ok(n as f64 / elapsed)
}

/// 1a: drains `n` queued rows with 2 clients, 50 rows per claim-and-complete statement.
async fn claim_and_complete(db: &Db, n: i64) -> Result<f64> {
    db.client
        .batch_execute("truncate spool.runs cascade")
        .await?;
    drain_by_clients(db, n, |client| async move {
        let stmt = client
            .prepare(&claim_sql("status = 'succeeded', finished_at = now()", ""))
            .await?;
        // bounded: every statement ends up to 50 rows and the table holds `n`
        let mut done = 0u64;
        loop {
            let got = client.execute(&stmt, &[&CLAIM_BATCH]).await?;
            if got == 0 {
                return Ok(done);
            }
            done += got;
        }
    })
    .await
}

/// What 1c measured.
#[derive(Debug, Default)]
struct TwoStep {
    per_sec: f64,
    wal_per_row: f64,
    wal_top: String,
}

/// 1c: drains `n` queued rows with 2 clients, each taking 512 rows to `running` in one
/// committed statement (locked in claim order, `FOR UPDATE SKIP LOCKED`), then ending them
/// `succeeded` in a second one: a run's two transitions in Spool, with none of its fencing.
async fn claim_then_finish(db: &Db, n: i64) -> Result<TwoStep> {
    db.client
        .batch_execute("truncate spool.runs cascade")
        .await?;
    db.checkpoint().await?;
    let wal_before = db.wal_lsn().await?;
    let per_sec = drain_by_clients(db, n, |client| async move {
        let claim = client
            .prepare(&claim_sql(
                "status = 'running', incarnation = 1",
                "returning r.id",
            ))
            .await?;
        let finish = client
            .prepare(
                "update spool.runs
                    set status = 'succeeded', finished_at = now(), updated_at = now()
                  where id = any($1::text[]) and status = 'running'",
            )
            .await?;
        // bounded: every claim takes up to 512 rows and the table holds `n`
        let mut done = 0u64;
        loop {
            let ids: Vec<String> = client
                .query(&claim, &[&TWO_STEP_BATCH])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if ids.is_empty() {
                return Ok(done);
            }
            let ended = client.execute(&finish, &[&ids]).await?;
            anyhow::ensure!(
                ended == ids.len() as u64,
                "finished {ended} of {}",
                ids.len()
            );
            done += ended;
        }
    })
    .await?;
    // the cluster's WAL: nothing else writes meanwhile but autovacuum
    let wal_after = db.wal_lsn().await?;
    Ok(TwoStep {
        per_sec,
        wal_per_row: (wal_after - wal_before) as f64 / n as f64,
        wal_top: db.wal_breakdown(wal_before, wal_after, n, 4).await?,
    })
}

/// 1b: single-row insert transactions from `clients` connections for `secs`.
async fn single_row_commits(db: &Db, clients: usize, secs: Duration) -> Result<f64> {
    insert_loop(
        db,
        clients,
        secs,
        "insert into spool.runs (workflow) values ('noop')",
    )
    .await
}

/// Runs `sql` (one row per transaction) from `clients` connections for `secs`; rows/s.
pub async fn insert_loop(
    db: &Db,
    clients: usize,
    secs: Duration,
    sql: &'static str,
) -> Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(db.connect().await?);
    }
    let started = Instant::now();
    let end = started + secs;
    let mut tasks = Vec::new();
    for client in conns {
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(sql).await?;
            let mut n = 0u64;
            while Instant::now() < end {
                client.execute(&stmt, &[]).await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
