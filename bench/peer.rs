//! Section 13 — the fastest peer, side by side: Graphile Worker (installed from npm into the
//! bench's scratch folder, run batched as its documentation recommends for throughput: a local
//! queue and batched completions) on the same private cluster, against the same kind of backlog,
//! measured the same way as Spool's drains: one statement inserts `runs` no-op jobs while the idle
//! worker waits; the rate is jobs ÷ (the moment its job table is empty − the insert's commit),
//! polled every 20 ms; commits and WAL bytes per job from `pg_stat_database` and the WAL position.
//! Median of three drains. Then enqueue → start: sequential jobs, each carrying the database's
//! clock at insert, the handler printing how long ago that was.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::harness::{quantile, Bench, Db};
use crate::report::{Row, Target, Unit};

const GRAPHILE_VERSION: &str = "0.17.3";
const DRIVER: &str = include_str!("peer/graphile.mjs");

pub struct PeerParams {
    pub runs: i64,
    pub latency_runs: usize,
}

/// What one Graphile Worker drain measured.
struct GwDrain {
    per_sec: f64,
    commits_per_job: f64,
    wal_per_job: f64,
    wal_top: String,
}

pub async fn measure(bench: &Bench, p: &PeerParams) -> Vec<Row> {
    let mut rows = Vec::new();
    let dir = match install(bench).await {
        Ok(d) => d,
        Err(e) => return vec![Row::failed(13, "Graphile Worker (npm install)", &e)],
    };
    let label = format!("Graphile Worker {GRAPHILE_VERSION} batched");
    let mut drains = Vec::new();
    for i in 0..3 {
        match drain(bench, &dir, p.runs, i).await {
            Ok(d) => drains.push(d),
            Err(e) => {
                rows.push(Row::failed(13, format!("{label}: no-op drain"), &e));
                break;
            }
        }
    }
    if drains.len() == 3 {
        drains.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        let d = &drains[1];
        rows.push(
            Row::new(
                13,
                format!("{label}: no-op drain, {} jobs, median of 3", p.runs),
                d.per_sec,
                Unit::PerSec("jobs"),
            )
            .note(format!(
                "{:.3} commits/job, {:.0} WAL bytes/job ({}); drains {:.0}, {:.0}, {:.0} jobs/s",
                d.commits_per_job,
                d.wal_per_job,
                d.wal_top,
                drains[0].per_sec,
                drains[1].per_sec,
                drains[2].per_sec
            )),
        );
        rows.push(
            Row::new(
                13,
                format!("{label}: WAL bytes per job (insert to finish, after a checkpoint)"),
                d.wal_per_job,
                Unit::Plain("B"),
            )
            .note(d.wal_top.clone()),
        );
        rows.push(Row::new(
            13,
            format!("{label}: commits per job"),
            d.commits_per_job,
            Unit::Plain(""),
        ));
    }
    match latency(bench, &dir, p.latency_runs).await {
        Ok(ms) => {
            rows.push(Row::new(
                13,
                format!(
                    "{label}: enqueue → start p50, {} sequential jobs",
                    p.latency_runs
                ),
                quantile(&ms, 0.5),
                Unit::Ms,
            ));
            rows.push(Row::new(
                13,
                format!("{label}: enqueue → start p99"),
                quantile(&ms, 0.99),
                Unit::Ms,
            ));
        }
        Err(e) => rows.push(Row::failed(13, format!("{label}: enqueue → start"), &e)),
    }
    rows
}

/// Spool ÷ Graphile Worker, from the rows of sections 2, 5 and 13 of the same run.
pub fn ratios(rows: &[Row]) -> Vec<Row> {
    let value = |prefix: &str| {
        rows.iter()
            .find(|r| r.figure.starts_with(prefix))
            .and_then(|r| r.value.as_ref().ok().copied())
    };
    let Some(gw) = value("Graphile Worker") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (figure, prefix, target) in [
        (
            "Spool tuned ÷ Graphile Worker batched, no-op drain",
            "no-op drain, 1 executor,",
            2.0,
        ),
        (
            "Spool at its defaults ÷ Graphile Worker batched, no-op drain",
            "no-op drain, 1 executor at Spool's defaults",
            1.0,
        ),
    ] {
        if let Some(spool) = value(prefix) {
            out.push(
                Row::new(13, figure, spool / gw, Unit::Plain("×")).target(Target::AtLeast(target)),
            );
        }
    }
    out
}

/// Installs the pinned Graphile Worker under the bench's work folder (once) with the driver.
async fn install(bench: &Bench) -> Result<PathBuf> {
    let dir = bench.work_dir.join("peer");
    std::fs::create_dir_all(&dir)?;
    let installed = dir.join("node_modules/graphile-worker/package.json");
    let current = std::fs::read_to_string(&installed).unwrap_or_default();
    if !current.contains(&format!("\"version\": \"{GRAPHILE_VERSION}\"")) {
        let out = Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("graphile-worker@{GRAPHILE_VERSION}"))
            .output()
            .await
            .context("npm (Node.js ≥ 20) runs the peer")?;
        if !out.status.success() {
            bail!(
                "npm install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::write(dir.join("graphile.mjs"), DRIVER)?;
    Ok(dir)
}

fn node(dir: &Path, db: &Db, mode: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("graphile.mjs"))
        .arg(mode)
        .env("DATABASE_URL", db.url.replace("?sslmode=disable", ""))
        .kill_on_drop(true);
    cmd
}

/// A running `graphile.mjs work`, ready (polling).
struct Worker {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    async fn start(dir: &Path, db: &Db) -> Result<Worker> {
        let migrate = node(dir, db, "migrate").output().await?;
        if !migrate.status.success() {
            bail!(
                "graphile-worker migrate: {}",
                String::from_utf8_lossy(&migrate.stderr)
            );
        }
        let mut child = node(dir, db, "work")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        match ready {
            Ok(Ok(Some(l))) if l == "ready" => Ok(Worker { child, lines }),
            other => bail!("graphile worker did not start: {other:?}"),
        }
    }

    async fn stop(mut self) -> Result<()> {
        drop(self.child.stdin.take()); // closing stdin stops it
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("graphile worker stops")??;
        Ok(())
    }
}

async fn drain(bench: &Bench, dir: &Path, runs: i64, i: usize) -> Result<GwDrain> {
    let db = bench.fresh_db(&format!("bench_peer_{i}")).await?;
    let worker = Worker::start(dir, &db).await?;
    db.checkpoint().await?;
    let commits_before = db.commits().await?;
    let wal_before = db.wal_lsn().await?;
    db.client
        .execute(
            "select count(*) from graphile_worker.add_jobs(array(
                 select row('noop', '{}'::json, null, null, null, null, null, null)::graphile_worker.job_spec
                   from generate_series(1, $1::int8)))",
            &[&runs],
        )
        .await?;
    let t0 = Instant::now();
    let mut polls = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await; // poll the drain
        polls += 1;
        let left: i64 = db
            .client
            .query_one("select count(*) from graphile_worker._private_jobs", &[])
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{left} jobs left after 120 s");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    worker.stop().await?;
    let commits = db.commits().await? - commits_before - polls - 3;
    let wal_after = db.wal_lsn().await?;
    let wal = wal_after - wal_before;
    let wal_top = db.wal_breakdown(wal_before, wal_after, runs, 4).await?;
    Ok(GwDrain {
        per_sec: runs as f64 / secs,
        commits_per_job: commits as f64 / runs as f64,
        wal_per_job: wal as f64 / runs as f64,
        wal_top,
    })
}

/// Enqueue → start in ms of `n` sequential jobs (after 20 to warm up).
async fn latency(bench: &Bench, dir: &Path, n: usize) -> Result<Vec<f64>> {
    let db = bench.fresh_db("bench_peer_latency").await?;
    let mut worker = Worker::start(dir, &db).await?;
    let insert = db
        .client
        .prepare("select graphile_worker.add_job('latency', json_build_object('t', extract(epoch from clock_timestamp())))")
        .await?;
    let mut ms = Vec::with_capacity(n);
    for i in 0..n + 20 {
        db.client.execute(&insert, &[]).await?;
        let line = tokio::time::timeout(Duration::from_secs(10), worker.lines.next_line())
            .await
            .context("a latency job started")??
            .context("graphile worker exited")?;
        let secs: f64 = line
            .strip_prefix("start ")
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("unexpected line {line:?}"))?;
        if i >= 20 {
            ms.push(secs * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(3)).await; // the same pause as Spool's section 5
    }
    worker.stop().await?;
    Ok(ms)
}
