//! Section 14 — the claim's cost beside what it cannot claim. One tuned executor drains `runs`
//! ready no-op runs on a fresh database:
//!
//! - 14a: alone;
//! - 14b: with `backlog` more ready runs *behind* them (inserted in a later statement, so later in
//!   claim order: same priority, later `run_at` and `enqueue_seq`);
//! - 14c: next to `scheduled` runs whose `run_at` is tomorrow;
//! - 14d: next to `key_waiting` runs queued behind one busy concurrency key: a `ticker` run that
//!   sleeps for an hour holds the key (inserted first, so the others are inserted waiting),
//!   executed by a second process that serves only the key's queue with one slot (so it never
//!   claims again and its claims cost the measured one nothing). It starts after the table was
//!   analyzed, so in every case the statistics saw no running run: whether they saw one changes
//!   the plans of Spool's batch statements (a running run caught by the sample of 14d made its
//!   drain twice as fast in some rounds).
//!
//! Every case is prepared the same way before any executor that could claim the measured runs
//! exists: a `checkpoint`, the measured runs inserted in one statement, then the load in another
//! (set-based `insert … select generate_series`), then `vacuum analyze spool.runs`, so each drain
//! starts with fresh statistics and an all-visible table, and no page is owed a full-page image
//! (every page was written since the checkpoint; the 500,000-run insert writes about 250 MB of
//! WAL, well below `max_wal_size`). A checkpoint *after* the inserts instead would make the first
//! write of every page during the drain a full-page image: with random UUID ids the claim's and
//! the finish's new index entries land on most leaves of the primary key, which costs the loaded
//! cases about 1.3 KB of WAL per run more than the lone one — a cost of checkpoints and key order,
//! not of the claim. Then the measured executor starts and drains. The bench holds the `metrics` and `retention`
//! maintenance leases meanwhile, as another executor of a deployment would: an executor that
//! holds the metrics lease reads the database's metrics at once when it starts, counting over the
//! whole table (0.1–0.35 s of database time beside 500,000 runs), which would land inside a drain
//! of about a second in the loaded cases only; once every interval it is a cost of its own, not
//! the claim's.
//!
//! What is measured is the drain of the `runs` measured runs, wherever the load is: runs/s =
//! `runs` ÷ (the last of them finished − the first of them started), both the database's clocks.
//! In 14b the executor goes on into the backlog once the measured runs are done; the figure stops
//! counting at them (the bench then stops the executor rather than wait for the backlog). Commits
//! and WAL bytes are counted from just before the executor starts until it has exited, per run
//! finished by then (in 14b that includes backlog runs finished before the stop); they include the
//! executor's start-up statements. Each loaded case is reported as a fraction of 14a; rounds run
//! the four cases in turn (so load on the machine falls on all of them alike) and each figure is
//! the median of its rounds.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::harness::{wait_for, Bench, Db, ProcSpec, Role, SpoolProcess};
use crate::report::{Row, Target, Unit};

pub struct ClaimLoadParams {
    /// Ready no-op runs drained in every case.
    pub runs: i64,
    /// 14b: ready runs behind them.
    pub backlog: i64,
    /// 14c: runs scheduled for tomorrow.
    pub scheduled: i64,
    /// 14d: runs waiting behind one busy key.
    pub key_waiting: i64,
    /// Rounds of the four cases; each figure is the median.
    pub rounds: usize,
    /// Longest one drain may take.
    pub drain_limit: Duration,
}

/// The load next to the measured runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Load {
    Alone,
    ReadyBehind,
    Scheduled,
    BusyKey,
}

impl Load {
    const ALL: [Load; 4] = [
        Load::Alone,
        Load::ReadyBehind,
        Load::Scheduled,
        Load::BusyKey,
    ];

    fn tag(self) -> &'static str {
        match self {
            Load::Alone => "a",
            Load::ReadyBehind => "b",
            Load::Scheduled => "c",
            Load::BusyKey => "d",
        }
    }

    fn figure(self, p: &ClaimLoadParams) -> String {
        let n = p.runs;
        match self {
            Load::Alone => format!("14a drain of {n} ready no-op runs, 1 tuned executor, alone"),
            Load::ReadyBehind => {
                format!("14b the same, {} more ready runs behind them", p.backlog)
            }
            Load::Scheduled => format!(
                "14c the same, next to {} runs scheduled for tomorrow",
                p.scheduled
            ),
            Load::BusyKey => format!(
                "14d the same, next to {} runs queued behind one busy key",
                p.key_waiting
            ),
        }
    }
}

/// What one drain measured.
#[derive(Debug, Clone)]
struct Drain {
    per_sec: f64,
    commits_per_run: f64,
    wal_per_run: f64,
    /// Runs finished when the executor stopped (the measured ones and, in 14b, some backlog).
    finished: i64,
    warnings: usize,
}

pub async fn measure(bench: &Bench, p: &ClaimLoadParams) -> Vec<Row> {
    let mut drains: Vec<Vec<Drain>> = vec![Vec::new(); Load::ALL.len()];
    let mut errors: Vec<Option<anyhow::Error>> = Load::ALL.iter().map(|_| None).collect();
    for round in 0..p.rounds {
        for (i, load) in Load::ALL.into_iter().enumerate() {
            match drain(bench, p, load, round).await {
                Ok(d) => {
                    eprintln!(
                        "  14{} round {}: {:.0} runs/s",
                        load.tag(),
                        round + 1,
                        d.per_sec
                    );
                    drains[i].push(d);
                }
                Err(e) => errors[i] = Some(e),
            }
        }
    }
    let alone = median(&drains[0]).map(|d| d.per_sec);
    Load::ALL
        .into_iter()
        .zip(drains.iter().zip(errors))
        .map(|(load, (ds, error))| {
            let figure = load.figure(p);
            let Some(d) = median(ds) else {
                let e = error.unwrap_or_else(|| anyhow::anyhow!("no round ran"));
                return Row::failed(14, figure, &e);
            };
            let mut row = Row::new(14, figure, d.per_sec, Unit::PerSec("runs")).note(note(ds, &d));
            if load != Load::Alone {
                row = row
                    .ceiling("14a", alone.unwrap_or(0.0))
                    .target(Target::RatioAtLeast(0.8));
            }
            row
        })
        .collect()
}

/// The round with the median rate.
fn median(drains: &[Drain]) -> Option<Drain> {
    let mut v = drains.to_vec();
    v.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    v.get(v.len().saturating_sub(1) / 2).cloned()
}

fn note(all: &[Drain], d: &Drain) -> String {
    let mut note = format!(
        "{:.3} commits/run, {:.0} WAL bytes/run over {} finished runs",
        d.commits_per_run, d.wal_per_run, d.finished
    );
    if all.len() > 1 {
        let rates: Vec<String> = all.iter().map(|d| format!("{:.0}", d.per_sec)).collect();
        note.push_str(&format!(
            "; median of {} rounds: {}",
            all.len(),
            rates.join(", ")
        ));
    }
    let warnings: usize = all.iter().map(|d| d.warnings).sum();
    if warnings > 0 {
        note.push_str(&format!("; {warnings} warnings in the executors' logs"));
    }
    note
}

/// One case on a fresh database.
async fn drain(bench: &Bench, p: &ClaimLoadParams, load: Load, round: usize) -> Result<Drain> {
    let name = format!("bench_claimload_{}", load.tag());
    let db = bench.fresh_db(&name).await?;
    db.client.batch_execute("checkpoint").await?;
    let seqs = db
        .client
        .query_one(
            "with m as (insert into spool.runs (workflow)
                        select 'noop' from generate_series(1, $1::int8)
                        returning enqueue_seq)
             select min(enqueue_seq), max(enqueue_seq) from m",
            &[&p.runs],
        )
        .await?;
    let (first, last): (i64, i64) = (seqs.get(0), seqs.get(1));
    insert_load(&db, p, load).await?;
    db.client.batch_execute("vacuum analyze spool.runs").await?;
    db.client
        .execute(
            "insert into spool.maintenance_leases (name, holder, expires_at)
             select name, 'bench', now() + interval '1 hour'
               from unnest(array['metrics', 'retention']) as name
             on conflict (name) do update
                set holder = excluded.holder, expires_at = excluded.expires_at",
            &[],
        )
        .await?;
    let _holder = match load {
        Load::BusyKey => Some(hold_key(bench, &db).await?),
        _ => None,
    };
    let commits_before = db.commits().await?;
    let wal_before = db.wal_lsn().await?;
    // not `start`: its liveness polls would be commits of their own, uncounted
    let mut executor = bench.spawn(
        &db,
        ProcSpec::new(format!("{name}-{}", round + 1), Role::Worker),
    )?;
    let polls = wait_measured_finished(&db, &mut executor, first, last, p.drain_limit).await?;
    let warnings = executor.warnings();
    executor.stop().await?;
    // our own transactions since the first count: its select, the WAL position, the polls, the
    // flush
    let commits = db.commits().await? - commits_before - polls - 3;
    let wal = db.wal_lsn().await? - wal_before;
    let row = db
        .client
        .query_one(
            "select count(*) filter (where enqueue_seq between $1 and $2),
                    count(*) filter (where enqueue_seq between $1 and $2 and status <> 'succeeded'),
                    coalesce(extract(epoch from
                        max(finished_at) filter (where enqueue_seq between $1 and $2)
                        - min(started_at) filter (where enqueue_seq between $1 and $2))::float8, 0),
                    count(*)
               from spool.runs where finished_at is not null",
            &[&first, &last],
        )
        .await?;
    let (measured, failed, secs, finished): (i64, i64, f64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if failed > 0 {
        bail!("{failed} of the measured runs did not succeed");
    }
    if secs <= 0.0 {
        bail!("the measured runs took no time");
    }
    Ok(Drain {
        per_sec: measured as f64 / secs,
        commits_per_run: commits as f64 / finished.max(1) as f64,
        wal_per_run: wal as f64 / finished.max(1) as f64,
        finished,
        warnings,
    })
}

/// The load of each case, in one statement.
async fn insert_load(db: &Db, p: &ClaimLoadParams, load: Load) -> Result<()> {
    match load {
        Load::Alone => {}
        Load::ReadyBehind => {
            db.client
                .execute(
                    "insert into spool.runs (workflow)
                     select 'noop' from generate_series(1, $1::int8)",
                    &[&p.backlog],
                )
                .await?;
        }
        Load::Scheduled => {
            db.client
                .execute(
                    "insert into spool.runs (workflow, run_at)
                     select 'noop', now() + interval '1 day' from generate_series(1, $1::int8)",
                    &[&p.scheduled],
                )
                .await?;
        }
        Load::BusyKey => {
            // the holder first, in a statement of its own: the runs inserted after it wait
            db.client
                .execute(
                    r#"insert into spool.runs (id, workflow, input, queue, concurrency_key)
                       values ('key-holder', 'ticker',
                               '{"count": 2, "interval_ms": 3600000, "steps": 1}', 'busy', 'k')"#,
                    &[],
                )
                .await?;
            db.client
                .execute(
                    "insert into spool.runs (workflow, queue, concurrency_key)
                     select 'noop', 'busy', 'k' from generate_series(1, $1::int8)",
                    &[&p.key_waiting],
                )
                .await?;
            let ready: i64 = db
                .client
                .query_one(
                    "select count(*) from spool.runs
                      where queue = 'busy' and status = 'queued' and key_ready
                        and id <> 'key-holder'",
                    &[],
                )
                .await?
                .get(0);
            if ready > 0 {
                bail!("{ready} runs behind the busy key are ready: the key is not held");
            }
        }
    }
    Ok(())
}

/// 14d: a process serving only queue `busy` with one slot starts the run `key-holder` of key
/// `k`, which sleeps for an hour (`ticker`: the second tick comes 3,600,000 ms after the first).
/// Returns the process once the run is running.
async fn hold_key(bench: &Bench, db: &Db) -> Result<SpoolProcess> {
    let spec = ProcSpec::new(format!("{}-holder", db.name), Role::Worker)
        .env("SPOOL_QUEUES", "busy")
        .env("SPOOL_CONCURRENCY", "1")
        .env("SPOOL_CLAIM_BATCH", "1");
    let holder = bench.start(db, spec).await?;
    wait_for(
        "the key holder to run",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            let status: String = db
                .client
                .query_one("select status from spool.runs where id = 'key-holder'", &[])
                .await?
                .get(0);
            Ok((status == "running").then_some(()))
        },
    )
    .await?;
    Ok(holder)
}

/// Polls every 100 ms until every measured run (enqueue_seq in first..=last) has finished; fails
/// if the executor exits first. Returns how many polls it made.
async fn wait_measured_finished(
    db: &Db,
    executor: &mut SpoolProcess,
    first: i64,
    last: i64,
    limit: Duration,
) -> Result<i64> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut polls = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        executor.check_running()?;
        polls += 1;
        let left: i64 = db
            .client
            .query_one(
                "select count(*) from spool.runs
                  where enqueue_seq between $1 and $2 and finished_at is null",
                &[&first, &last],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(polls);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{left} measured runs unfinished after {limit:?}");
        }
    }
}
