//! Sections 2 (no-op throughput) and 4 (memoized steps): a backlog inserted in one statement while
//! idle executors wait, drained to the end. The rate is taken from the database's own clocks: runs
//! finished / (last `finished_at` − first `started_at`). Commits per run come from
//! `pg_stat_database` (after the executors exited, so every backend reported its count).

use std::time::Duration;

use anyhow::Result;

use crate::ceiling::Ceiling;
use crate::harness::{Bench, Db, ProcSpec, Role, SpoolProcess};
use crate::report::{Row, Target, Unit};

pub struct ThroughputParams {
    pub noop_runs: i64,
    pub step_runs: i64,
    /// Longest a drain may take before it is reported as timed out.
    pub drain_limit: Duration,
}

/// What a drain measured.
struct Drain {
    finished: i64,
    failed: i64,
    per_sec: f64,
    commits_per_run: f64,
    /// WAL bytes written from the insert to the end of the drain, per run.
    wal_per_run: f64,
    /// Where those bytes went, per record type (pg_walinspect).
    wal_top: String,
    timed_out: bool,
    /// Warning and error lines the executors logged.
    warnings: usize,
}

impl Drain {
    fn note(&self, total: i64) -> String {
        let mut note = format!(
            "{:.3} commits/run, {:.0} WAL bytes/run ({})",
            self.commits_per_run, self.wal_per_run, self.wal_top
        );
        if self.timed_out {
            note.push_str(&format!(
                "; TIMED OUT: {} of {total} finished",
                self.finished
            ));
        }
        if self.failed > 0 {
            note.push_str(&format!("; {} runs did not succeed", self.failed));
        }
        if self.warnings > 0 {
            note.push_str(&format!(
                "; {} warnings in the executors' logs",
                self.warnings
            ));
        }
        note
    }
}

/// 2: `noop_runs` no-op runs drained by 1, 2 and 4 executors (a fresh database each).
pub async fn noop(bench: &Bench, p: &ThroughputParams, ceiling: &Ceiling) -> Vec<Row> {
    let mut rows = Vec::new();
    for executors in [1, 2, 4] {
        let plural = if executors == 1 { "" } else { "s" };
        let figure = format!(
            "no-op drain, {executors} executor{plural}, {} runs",
            p.noop_runs
        );
        // one executor is the figure compared with Graphile Worker's (a median of 3 drains)
        let rounds = if executors == 1 { PEER_ROUNDS } else { 1 };
        match median_drain(rounds, || noop_drain_with(bench, p, executors, false, None)).await {
            Ok((d, rates)) => {
                rows.push(
                    Row::new(2, figure, d.per_sec, Unit::PerSec("runs"))
                        .ceiling("1a", ceiling.claim_complete)
                        .target(Target::RatioAtLeast(0.5))
                        .note(with_rates(d.note(p.noop_runs), &rates, "runs")),
                );
                if executors == 1 {
                    rows.push(
                        Row::new(
                            2,
                            "no-op drain, 1 executor: WAL bytes per run (insert to finish, after a checkpoint)",
                            d.wal_per_run,
                            Unit::Plain("B"),
                        )
                        .target(Target::AtMost(600.0))
                        .note(d.wal_top.clone()),
                    );
                    rows.push(
                        Row::new(
                            2,
                            "no-op drain, 1 executor: commits per run",
                            d.commits_per_run,
                            Unit::Plain(""),
                        )
                        .target(Target::AtMost(0.01)),
                    );
                }
            }
            Err(e) => rows.push(Row::failed(2, figure, &e)),
        }
    }
    let figure = format!(
        "no-op drain, 1 executor at Spool's defaults (adaptive slots), {} runs",
        p.noop_runs
    );
    rows.push(
        match median_drain(PEER_ROUNDS, || noop_drain_with(bench, p, 1, true, None)).await {
            Ok((d, rates)) => Row::new(2, figure, d.per_sec, Unit::PerSec("runs"))
                .ceiling("1a", ceiling.claim_complete)
                .target(Target::RatioAtLeast(0.5))
                .note(with_rates(d.note(p.noop_runs), &rates, "runs")),
            Err(e) => Row::failed(2, figure, &e),
        },
    );
    // The drains above start as soon as their executors are up. A deployed executor has usually
    // idled first: its claim then ran a few times on an empty queue, and PostgreSQL may keep the
    // generic plan it made from those until the next ANALYZE.
    let figure = format!(
        "no-op drain, 1 executor at Spool's defaults after it idled {} s on an empty queue, {} runs",
        IDLE_FIRST.as_secs(),
        p.noop_runs
    );
    rows.push(
        match noop_drain_with(bench, p, 1, true, Some(IDLE_FIRST)).await {
            Ok(d) => Row::new(2, figure, d.per_sec, Unit::PerSec("runs"))
                .ceiling("1a", ceiling.claim_complete)
                .target(Target::RatioAtLeast(0.5))
                .note(d.note(p.noop_runs)),
            Err(e) => Row::failed(2, figure, &e),
        },
    );
    rows
}

/// Long enough for an idle executor's fallback polls (every 500 ms, jittered) to claim more
/// than five times: the plan cache then settles on a generic plan.
const IDLE_FIRST: Duration = Duration::from_secs(5);

/// Drains of the figures compared with Graphile Worker's, whose figure is the median of as many.
const PEER_ROUNDS: usize = 3;

/// Runs `drain` `rounds` times: the median drain by rate, and every drain's rate in order.
async fn median_drain<F, Fut>(rounds: usize, mut drain: F) -> Result<(Drain, Vec<f64>)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Drain>>,
{
    let mut drains = Vec::new();
    for _ in 0..rounds {
        drains.push(drain().await?);
    }
    let rates = drains.iter().map(|d| d.per_sec).collect();
    drains.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    Ok((drains.swap_remove((rounds - 1) / 2), rates))
}

/// `note`, and the rate of each drain when there were several.
fn with_rates(note: String, rates: &[f64], unit: &str) -> String {
    if rates.len() < 2 {
        return note;
    }
    let each: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    format!(
        "{note}; median of {} drains: {} {unit}/s",
        rates.len(),
        each.join(", ")
    )
}

async fn noop_drain_with(
    bench: &Bench,
    p: &ThroughputParams,
    executors: usize,
    defaults: bool,
    idle_first: Option<Duration>,
) -> Result<Drain> {
    let suffix = match (defaults, idle_first) {
        (_, Some(_)) => "_idle",
        (true, None) => "_defaults",
        (false, None) => "",
    };
    let db = bench
        .fresh_db(&format!("bench_noop_{executors}{suffix}"))
        .await?;
    let sql = "insert into spool.runs (workflow) select 'noop' from generate_series(1, $1::int8)";
    drain_with(
        bench,
        &db,
        executors,
        sql,
        p.noop_runs,
        p.drain_limit,
        Start {
            defaults,
            idle_first,
        },
    )
    .await
}

/// Drains of section 4; its figure is the median. One drain of 200,000 steps takes about 5 s,
/// and this machine's speed varies over seconds (36k–53k steps/s for the same build in one
/// hour), so one drain was mostly noise.
const STEP_ROUNDS: usize = 3;

/// 4: runs of 10 memoized no-op steps (`ticker`, 10 steps of one chunk each, no NATS: the
/// chunks go nowhere), one executor, [`STEP_ROUNDS`] drains each in a fresh database. Steps/s =
/// 10 × runs/s of the median drain.
pub async fn steps(bench: &Bench, p: &ThroughputParams, ceiling: &Ceiling) -> Vec<Row> {
    let figure = format!(
        "memoized steps, 1 executor, {} runs × 10 steps",
        p.step_runs
    );
    let (d, rates) = match median_drain(STEP_ROUNDS, || steps_drain(bench, p)).await {
        Ok(m) => m,
        Err(e) => return vec![Row::failed(4, figure, &e)],
    };
    let steps: Vec<f64> = rates.iter().map(|r| r * 10.0).collect();
    vec![Row::new(4, figure, d.per_sec * 10.0, Unit::PerSec("steps"))
        .ceiling("1b 16 clients", ceiling.commits_16)
        .target(Target::AtLeast(5_000.0))
        .note(with_rates(d.note(p.step_runs), &steps, "steps"))]
}

async fn steps_drain(bench: &Bench, p: &ThroughputParams) -> Result<Drain> {
    let db = bench.fresh_db("bench_steps").await?;
    let sql = r#"insert into spool.runs (workflow, input)
                 select 'ticker', '{"count": 10, "interval_ms": 0, "steps": 10}'
                   from generate_series(1, $1::int8)"#;
    drain(bench, &db, 1, sql, p.step_runs, p.drain_limit).await
}

/// Starts `executors` idle worker processes, inserts `n` runs with `insert_sql` (one statement,
/// `$1` = n), and waits until no run is queued or running (or `limit` passes).
async fn drain(
    bench: &Bench,
    db: &Db,
    executors: usize,
    insert_sql: &str,
    n: i64,
    limit: Duration,
) -> Result<Drain> {
    drain_with(bench, db, executors, insert_sql, n, limit, Start::default()).await
}

/// How a drain's executors start.
#[derive(Debug, Clone, Copy, Default)]
struct Start {
    /// At Spool's defaults (adaptive slots) instead of the bench's tuned settings.
    defaults: bool,
    /// Idle this long on the empty queue before the runs are inserted.
    idle_first: Option<Duration>,
}

async fn drain_with(
    bench: &Bench,
    db: &Db,
    executors: usize,
    insert_sql: &str,
    n: i64,
    limit: Duration,
    start: Start,
) -> Result<Drain> {
    let mut procs = Vec::new();
    for i in 1..=executors {
        // the API too (as deployed by default): the drain's end is read from its /metrics
        let mut spec = ProcSpec::new(format!("{}-{i}", db.name), Role::Both);
        spec.defaults = start.defaults;
        procs.push(bench.start(db, spec).await?);
    }
    if let Some(idle) = start.idle_first {
        tokio::time::sleep(idle).await;
    }
    db.checkpoint().await?;
    let commits_before = db.commits().await?;
    let wal_before = db.wal_lsn().await?;
    db.client.execute(insert_sql, &[&n]).await?;
    let timed_out = wait_drained(&procs, n, limit).await?;
    let warnings = procs.iter().map(|p| p.warnings()).sum();
    for p in procs {
        p.stop().await?;
    }
    // our own transactions since the first count: its select, the insert, the flush
    let own = 3;
    let commits = db.commits().await? - commits_before - own;
    // the cluster's WAL: nothing else writes during a drain but autovacuum
    let wal_after = db.wal_lsn().await?;
    let wal = wal_after - wal_before;
    let row = db
        .client
        .query_one(
            "select count(*) filter (where finished_at is not null),
                    count(*) filter (where finished_at is not null and status <> 'succeeded'),
                    coalesce(extract(epoch from max(finished_at) - min(started_at))::float8, 0)
               from spool.runs",
            &[],
        )
        .await?;
    let (finished, failed, secs): (i64, i64, f64) = (row.get(0), row.get(1), row.get(2));
    let wal_top = db.wal_breakdown(wal_before, wal_after, finished, 4).await?;
    Ok(Drain {
        finished,
        failed,
        per_sec: if secs > 0.0 {
            finished as f64 / secs
        } else {
            0.0
        },
        commits_per_run: commits as f64 / finished.max(1) as f64,
        wal_per_run: wal as f64 / finished.max(1) as f64,
        wal_top,
        timed_out,
        warnings,
    })
}

/// Waits until the executors `procs` have ended `n` runs between them, by their counters at
/// `/metrics` (each counts a run once its end is committed), or until `limit` passes. Returns
/// whether it timed out. The drain is not asked of the database: a count of unfinished runs
/// read every version of every row at each poll (about 10 ms a poll at 50,000 runs and 40 ms at
/// 200,000, on the two cores the drain shares), where Graphile Worker's poll counts a table its
/// finished jobs have left.
async fn wait_drained(procs: &[SpoolProcess], n: i64, limit: Duration) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + limit;
    let http = reqwest::Client::new();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut ended = 0.0;
        for p in procs {
            let text = http.get(p.url("/metrics")).send().await?.text().await?;
            ended += [
                "spool_runs_succeeded_total",
                "spool_runs_failed_total",
                "spool_runs_cancelled_total",
                "spool_runs_dead_total",
            ]
            .iter()
            .filter_map(|name| counter(&text, name))
            .sum::<f64>();
        }
        if ended >= n as f64 {
            return Ok(false);
        }
        if tokio::time::Instant::now() > deadline {
            return Ok(true);
        }
    }
}

/// The value of the unlabelled sample `name` in Prometheus text.
fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
