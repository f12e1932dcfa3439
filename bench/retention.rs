//! Section 12 (retention): what deleting old runs costs the runs being executed, and whether the
//! tables stop growing once retention runs.
//!
//! - 12a/12b: `backlog` finished runs, a month old, are in the table. The same no-op drain runs
//!   twice on two such databases: with `SPOOL_RETENTION=off`, and with retention on (1 h, a
//!   maintenance round every 200 ms) after the purge of the old runs has begun, so the drain
//!   happens while batches are being deleted. Figure: drain time with purging ÷ without.
//!   Then how fast the whole backlog goes.
//! - 12c: a soak. Retention 2 s; rounds of `soak_runs` no-op runs are enqueued and drained for
//!   `soak_secs`; the size of `spool.runs` and `spool.operation_outputs` with their indexes is
//!   read after the first minute and at the end (autovacuum, at its defaults, reclaims what the
//!   deletes free).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::harness::{Bench, Db, ProcSpec, Role};
use crate::report::{Row, Target, Unit};

pub struct RetentionParams {
    /// Old finished runs in the table at the start.
    pub backlog: i64,
    /// No-op runs drained beside the purge.
    pub drain_runs: i64,
    /// Length of the soak, and no-op runs per soak round.
    pub soak_secs: u64,
    pub soak_runs: i64,
}

pub async fn measure(bench: &Bench, p: &RetentionParams) -> Vec<Row> {
    let mut rows = Vec::new();
    match drain_beside_purge(bench, p).await {
        Ok(r) => {
            rows.push(
                Row::new(
                    12,
                    format!(
                        "no-op drain of {} runs beside the purge of {} old runs, time ÷ without",
                        p.drain_runs, p.backlog
                    ),
                    r.ratio,
                    Unit::Plain("×"),
                )
                .target(Target::AtMost(1.1))
                .note(format!(
                    "{:.2} s with purging, {:.2} s without; {} old runs deleted during the drain",
                    r.with_secs, r.without_secs, r.purged_during
                )),
            );
            rows.push(
                Row::new(
                    12,
                    format!("retention: deleting {} finished runs", p.backlog),
                    r.purge_rate,
                    Unit::PerSec("runs"),
                )
                .note(format!(
                    "{:.1} s in windows of 1,000 runs, one executor, while it also executed",
                    r.purge_secs
                )),
            );
        }
        Err(e) => rows.push(Row::failed(12, "retention beside a drain", &e)),
    }
    match soak(bench, p).await {
        Ok(s) => rows.push(
            Row::new(
                12,
                format!(
                    "soak {} s, retention 2 s: table + index bytes at the end ÷ after 1 min",
                    p.soak_secs
                ),
                s.end as f64 / s.first_minute.max(1) as f64,
                Unit::Plain("×"),
            )
            .target(Target::AtMost(1.25))
            .note(format!(
                "{:.1} MB after 1 min, {:.1} MB at the end; {} runs executed and deleted; grew most: {}",
                s.first_minute as f64 / 1e6,
                s.end as f64 / 1e6,
                s.runs,
                s.growth
                    .iter()
                    .map(|(name, then, end)| format!("{name} {then:.1} → {end:.1} MB"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ),
        Err(e) => rows.push(Row::failed(12, "retention soak", &e)),
    }
    rows
}

struct BesidePurge {
    ratio: f64,
    with_secs: f64,
    without_secs: f64,
    purged_during: i64,
    purge_rate: f64,
    purge_secs: f64,
}

async fn backlog_db(bench: &Bench, name: &str, backlog: i64) -> Result<Db> {
    let db = bench.fresh_db(name).await?;
    db.client
        .execute(
            "insert into spool.runs (workflow, status, executor_id, attempt, output, created_at, started_at, finished_at)
             select 'old', 'succeeded', 'gone', 1, '{}', now() - interval '31 days',
                    now() - interval '31 days', now() - interval '30 days' + i * interval '1 millisecond'
               from generate_series(1, $1::int8) i",
            &[&backlog],
        )
        .await?;
    db.client.batch_execute("vacuum analyze spool.runs").await?;
    Ok(db)
}

async fn old_left(db: &Db) -> Result<i64> {
    Ok(db
        .client
        .query_one(
            "select count(*) from spool.runs where workflow = 'old'",
            &[],
        )
        .await?
        .get(0))
}

/// Enqueues `n` no-op runs in one statement and returns the drain time by the database's clocks.
async fn drain(db: &Db, n: i64, limit: Duration) -> Result<f64> {
    let t0: f64 = db
        .client
        .query_one("select extract(epoch from clock_timestamp())::float8", &[])
        .await?
        .get(0);
    db.client
        .execute(
            "insert into spool.runs (workflow) select 'noop' from generate_series(1, $1::int8)",
            &[&n],
        )
        .await?;
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await; // poll the drain
        let left: i64 = db
            .client
            .query_one(
                "select count(*) from spool.runs where status in ('queued', 'running')",
                &[],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        if started.elapsed() > limit {
            bail!("the drain did not finish within {limit:?}");
        }
    }
    let end: f64 = db
        .client
        .query_one(
            "select coalesce(extract(epoch from max(finished_at))::float8, 0) from spool.runs where workflow = 'noop'",
            &[],
        )
        .await?
        .get(0);
    Ok(end - t0)
}

async fn drain_beside_purge(bench: &Bench, p: &RetentionParams) -> Result<BesidePurge> {
    let limit = Duration::from_secs(120);
    // without retention
    let db = backlog_db(bench, "bench_retention_off", p.backlog).await?;
    let spec = ProcSpec::new("keeper-off", Role::Worker).env("SPOOL_RETENTION", "off");
    let exec = bench.start(&db, spec).await?;
    let without_secs = drain(&db, p.drain_runs, limit).await?;
    exec.stop().await?;
    drop(db);

    // with retention, the purge already going
    let db = backlog_db(bench, "bench_retention_on", p.backlog).await?;
    let spec = ProcSpec::new("keeper-on", Role::Worker)
        .env("SPOOL_RETENTION", "1h")
        .env("SPOOL_MAINTENANCE_INTERVAL_MS", "200");
    let exec = bench.start(&db, spec).await?;
    let purge_started = Instant::now();
    let before = loop {
        let left = old_left(&db).await?;
        if left < p.backlog {
            break left;
        }
        if purge_started.elapsed() > limit {
            bail!("retention deleted nothing within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll for the first batch
    };
    let with_secs = drain(&db, p.drain_runs, limit).await?;
    let after = old_left(&db).await?;
    if after == 0 {
        bail!("the purge ended before the drain did: raise BENCH_RETENTION_BACKLOG");
    }
    loop {
        if old_left(&db).await? == 0 {
            break;
        }
        if purge_started.elapsed() > Duration::from_secs(600) {
            bail!("the backlog was not deleted within 10 min");
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // poll the purge
    }
    let purge_secs = purge_started.elapsed().as_secs_f64();
    exec.stop().await?;
    Ok(BesidePurge {
        ratio: with_secs / without_secs,
        with_secs,
        without_secs,
        purged_during: before - after,
        purge_rate: p.backlog as f64 / purge_secs,
        purge_secs,
    })
}

struct Soak {
    first_minute: i64,
    end: i64,
    runs: i64,
    /// The relations that grew most between the first minute and the end: (name, MB then, MB at
    /// the end).
    growth: Vec<(String, f64, f64)>,
}

async fn sizes(db: &Db) -> Result<i64> {
    Ok(db
        .client
        .query_one(
            "select pg_total_relation_size('spool.runs') + pg_total_relation_size('spool.operation_outputs')",
            &[],
        )
        .await?
        .get(0))
}

/// Bytes of each table and index of the two tables the soak measures.
async fn relation_sizes(db: &Db) -> Result<Vec<(String, i64)>> {
    let rows = db
        .client
        .query(
            "select c.relname::text, pg_relation_size(c.oid)
               from pg_class c
              where c.oid in ('spool.runs'::regclass, 'spool.operation_outputs'::regclass)
                 or c.oid in (select indexrelid from pg_index
                               where indrelid in ('spool.runs'::regclass,
                                                  'spool.operation_outputs'::regclass))",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The `n` relations that grew most from `before` to `after`.
fn most_grown(
    before: &[(String, i64)],
    after: &[(String, i64)],
    n: usize,
) -> Vec<(String, f64, f64)> {
    let mut grown: Vec<(String, f64, f64)> = after
        .iter()
        .map(|(name, a)| {
            let b = before
                .iter()
                .find(|(x, _)| x == name)
                .map_or(0, |(_, b)| *b);
            (name.clone(), b as f64 / 1e6, *a as f64 / 1e6)
        })
        .collect();
    grown.sort_by(|x, y| (y.2 - y.1).total_cmp(&(x.2 - x.1)));
    grown.truncate(n);
    grown
}

async fn soak(bench: &Bench, p: &RetentionParams) -> Result<Soak> {
    let db = bench.fresh_db("bench_retention_soak").await?;
    let spec = ProcSpec::new("soak", Role::Worker)
        .env("SPOOL_RETENTION", "2s")
        .env("SPOOL_MAINTENANCE_INTERVAL_MS", "200");
    let exec = bench.start(&db, spec).await?;
    let started = Instant::now();
    let mut first_minute = None;
    let mut first_relations = Vec::new();
    let mut runs = 0;
    while started.elapsed() < Duration::from_secs(p.soak_secs) {
        drain(&db, p.soak_runs, Duration::from_secs(120)).await?;
        runs += p.soak_runs;
        if first_minute.is_none() && started.elapsed() >= Duration::from_secs(60) {
            first_minute = Some(sizes(&db).await?);
            first_relations = relation_sizes(&db).await?;
        }
    }
    let end = sizes(&db).await?;
    let growth = most_grown(&first_relations, &relation_sizes(&db).await?, 3);
    exec.stop().await?;
    Ok(Soak {
        first_minute: first_minute.unwrap_or(end),
        end,
        runs,
        growth,
    })
}
