//! Section 6 — Live output: publish rate, attach → first chunk, and 1,000 attachers on one run —
//! which also gives 8b, the memory of idle attachers (measured while they wait for the run to
//! start).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::harness::{
    ms, quantile, rss_bytes, wait_for, AbortOnDrop, Bench, Db, ProcSpec, Role, SpoolProcess,
};
use crate::report::{Row, Target, Unit};
use crate::sse;

pub struct ChunkParams {
    /// 6a: concurrent `ticker` runs and chunks per run.
    pub publish_runs: i64,
    pub publish_count: i64,
    /// 6b: attach samples.
    pub attach_samples: usize,
    /// 6c/8b: attachers on one run, and that run's chunks (one every millisecond).
    pub attachers: usize,
    pub fanout_count: i64,
}

pub async fn measure(bench: &Bench, p: &ChunkParams) -> Vec<Row> {
    let mut rows = Vec::new();
    let figure = format!(
        "6a chunks published, total: {} runs × {} chunks, 1 executor",
        p.publish_runs, p.publish_count
    );
    match publish_rate(bench, p).await {
        Ok(published) => {
            let mut note = format!("warnings logged by the executor: {}", published.warnings);
            if published.finished < p.publish_runs {
                note.push_str(&format!(
                    "; TIMED OUT: {} of {} runs finished within a minute",
                    published.finished, p.publish_runs
                ));
            }
            rows.push(
                Row::new(6, figure, published.total, Unit::PerSec("chunks"))
                    .target(Target::AtLeast(50_000.0))
                    .note(note),
            );
            rows.push(Row::new(
                6,
                "6a chunks published per run (median)",
                published.per_run,
                Unit::PerSec("chunks"),
            ));
        }
        Err(e) => rows.push(Row::failed(6, figure, &e)),
    }
    let figure = format!(
        "6d chunks published to a 3-node NATS cluster, stream kept on all 3: {} runs × {} chunks",
        p.publish_runs, p.publish_count
    );
    let single = rows.first().and_then(|r| r.value.clone().ok());
    match publish_to_a_cluster(bench, p).await {
        Ok(published) => {
            let mut note = format!("warnings logged by the executor: {}", published.warnings);
            if let Some(single) = single.filter(|v| *v > 0.0) {
                note = format!(
                    "{:.2}× 6a (one node, one copy); {note}",
                    published.total / single
                );
            }
            if published.finished < p.publish_runs {
                note.push_str(&format!(
                    "; TIMED OUT: {} of {} runs finished within a minute",
                    published.finished, p.publish_runs
                ));
            }
            rows.push(Row::new(6, figure, published.total, Unit::PerSec("chunks")).note(note));
        }
        Err(e) => rows.push(Row::failed(6, figure, &e)),
    }
    match LiveCluster::start(bench).await {
        Ok(live) => {
            rows.extend(attach_latency(&live, p.attach_samples).await);
            rows.extend(fan_out(&live, p).await);
        }
        Err(e) => rows.push(Row::failed(6, "6b/6c live cluster", &e)),
    }
    rows
}

/// What 6a measured.
struct Published {
    /// Chunks/s of all runs together, and the median of one run's own rate.
    total: f64,
    per_run: f64,
    /// Runs that succeeded within the time limit.
    finished: i64,
    /// Warning and error lines the executor logged.
    warnings: usize,
}

/// 6a: `publish_runs` tickers of `publish_count` chunks each (no interval, one step) at once on
/// one executor with NATS. Runs still unfinished after a minute are left out of the rates (and
/// counted in the note).
async fn publish_rate(bench: &Bench, p: &ChunkParams) -> Result<Published> {
    let spec = ProcSpec::new("bench-publish", Role::Worker).with_nats("bench_publish");
    publish_with(bench, p, "bench_publish", spec).await
}

/// 6d: 6a on a three-node NATS cluster of the bench's own, the stream kept on all three
/// (`SPOOL_NATS_REPLICAS=3`): every chunk is acknowledged once two nodes hold it.
async fn publish_to_a_cluster(bench: &Bench, p: &ChunkParams) -> Result<Published> {
    let cluster = NatsCluster::start(&bench.work_dir.join("nats-cluster")).await?;
    let spec = ProcSpec::new("bench-publish-r3", Role::Worker)
        .with_nats("bench_publish_r3")
        .env("NATS_URL", cluster.urls())
        .env("SPOOL_NATS_REPLICAS", "3");
    publish_with(bench, p, "bench_publish_r3", spec).await
}

/// Three `nats-server -js` nodes routed into one cluster; dropping it kills them.
struct NatsCluster {
    ports: Vec<u16>,
    children: Vec<std::process::Child>,
}

impl NatsCluster {
    async fn start(dir: &std::path::Path) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push((free()?, free()?));
        }
        let mut cluster = Self {
            ports: ports.iter().map(|(p, _)| *p).collect(),
            children: Vec::new(),
        };
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .filter(|(p, _)| p != port)
                .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
                .collect();
            let name = format!("n{}", i + 1);
            let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
            let child = std::process::Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
                .args(["--server_name", &name, "--cluster_name", "spool-bench"])
                .args(["--cluster", &format!("nats://127.0.0.1:{cluster_port}")])
                .args(["--routes", &routes.join(",")])
                .arg("-sd")
                .arg(dir.join(&name))
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("nats-server")?;
            cluster.children.push(child);
        }
        for port in cluster.ports.clone() {
            wait_for(
                "every NATS node to answer JetStream requests",
                Duration::from_secs(60),
                Duration::from_millis(200),
                || async move {
                    let Ok(client) = async_nats::connect(format!("127.0.0.1:{port}")).await else {
                        return Ok(None);
                    };
                    let js = async_nats::jetstream::new(client);
                    Ok(js.query_account().await.ok().map(|_| ()))
                },
            )
            .await?;
        }
        Ok(cluster)
    }

    fn urls(&self) -> String {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        urls.join(",")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn publish_with(
    bench: &Bench,
    p: &ChunkParams,
    db_name: &str,
    spec: ProcSpec,
) -> Result<Published> {
    let db = bench.fresh_db(db_name).await?;
    let executor = bench.start(&db, spec).await?;
    let input = serde_json::json!({"count": p.publish_count, "interval_ms": 0, "steps": 1});
    db.client
        .execute(
            "insert into spool.runs (workflow, input) select 'ticker', $2 from generate_series(1, $1::int8)",
            &[&p.publish_runs, &input],
        )
        .await?;
    // a timeout is reported in the figure's note, not as a failure
    let _ = wait_all_finished(&db, Duration::from_secs(60)).await;
    let row = db
        .client
        .query_one(
            "select count(*) filter (where status = 'succeeded'),
                    count(*) filter (where finished_at is not null and status <> 'succeeded'),
                    extract(epoch from max(finished_at) - min(started_at))::float8,
                    percentile_cont(0.5) within group (
                        order by extract(epoch from finished_at - started_at)::float8)
               from spool.runs where finished_at is not null",
            &[],
        )
        .await?;
    let (finished, not_ok): (i64, i64) = (row.get(0), row.get(1));
    ensure!(not_ok == 0, "{not_ok} ticker runs did not succeed");
    ensure!(finished > 0, "no ticker run finished within a minute");
    let (total_secs, median_secs): (f64, f64) = (row.get(2), row.get(3));
    Ok(Published {
        total: (finished * p.publish_count) as f64 / total_secs,
        per_run: p.publish_count as f64 / median_secs,
        finished,
        warnings: executor.warnings(),
    })
}

async fn wait_all_finished(db: &Db, limit: Duration) -> Result<()> {
    wait_for(
        "every run to finish",
        limit,
        Duration::from_millis(100),
        || async {
            let left: i64 = db
                .client
                .query_one(
                    "select count(*) from spool.runs where status in ('queued', 'running')",
                    &[],
                )
                .await?
                .get(0);
            Ok((left == 0).then_some(()))
        },
    )
    .await
}

/// An API-only process that attachers use, and an executor serving only queue `default` (so a
/// run in queue `held` waits until it is moved).
struct LiveCluster {
    db: Db,
    api: SpoolProcess,
    _executor: SpoolProcess,
    http: reqwest::Client,
}

impl LiveCluster {
    async fn start(bench: &Bench) -> Result<Self> {
        let db = bench.fresh_db("bench_attach").await?;
        let api = ProcSpec::new("bench-attach-api", Role::Api)
            .with_nats("bench_attach")
            .env("SPOOL_MAX_ATTACHERS_PER_RUN", "100000")
            .env("SPOOL_MAX_ATTACHERS", "100000");
        let executor = ProcSpec::new("bench-attach-worker", Role::Worker)
            .with_nats("bench_attach")
            .env("SPOOL_QUEUES", "default")
            .env("SPOOL_POLL_INTERVAL_MS", "50");
        let api = bench.start(&db, api).await?;
        let executor = bench.start(&db, executor).await?;
        Ok(Self {
            db,
            api,
            _executor: executor,
            http: reqwest::Client::new(),
        })
    }

    async fn insert_ticker(&self, queue: &str, count: i64, interval_ms: i64) -> Result<String> {
        let input = serde_json::json!({"count": count, "interval_ms": interval_ms, "steps": 1});
        let row = self
            .db
            .client
            .query_one(
                "insert into spool.runs (workflow, input, queue) values ('ticker', $1, $2) returning id",
                &[&input, &queue],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Attaches to `run_id` and waits for its first `chunk` event.
    async fn first_chunk(&self, run_id: &str) -> Result<()> {
        let base = self.api.url("");
        let mut stream = sse::attach(&self.http, &base, run_id).await?;
        let wait = async {
            while let Some(e) = stream.next().await? {
                if e.kind == "chunk" {
                    return Ok(());
                }
                ensure!(!e.is_end(), "run {run_id} ended before its first chunk");
            }
            anyhow::bail!("stream of {run_id} closed before its first chunk")
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .context("no chunk within 10 s")?
    }
}

/// 6b: attach → first chunk on a run that is already streaming (50 ticks, one every 10 ms; the
/// attach starts 30 ms after the run started), and, end to end, enqueue + attach → first chunk.
async fn attach_latency(live: &LiveCluster, samples: usize) -> Vec<Row> {
    let mut streaming = Vec::new();
    let mut end_to_end = Vec::new();
    let measured = async {
        for _ in 0..samples {
            let id = live.insert_ticker("default", 50, 10).await?;
            wait_started(&live.db, &id).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
            let t0 = Instant::now();
            live.first_chunk(&id).await?;
            streaming.push(ms(t0.elapsed()));

            let t0 = Instant::now();
            let id = live.insert_ticker("default", 50, 10).await?;
            live.first_chunk(&id).await?;
            end_to_end.push(ms(t0.elapsed()));
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = measured {
        return vec![Row::failed(6, "6b attach → first chunk", &e)];
    }
    vec![
        Row::new(
            6,
            format!("6b attach → first chunk p50 (run streaming, {samples} samples)"),
            quantile(&streaming, 0.5),
            Unit::Ms,
        )
        .target(Target::AtMost(10.0))
        .note(format!("p99 {:.1} ms", quantile(&streaming, 0.99))),
        Row::new(
            6,
            "6b enqueue + attach → first chunk p50 (attached at enqueue)",
            quantile(&end_to_end, 0.5),
            Unit::Ms,
        )
        .note(format!("p99 {:.1} ms", quantile(&end_to_end, 0.99))),
    ]
}

async fn wait_started(db: &Db, id: &str) -> Result<()> {
    wait_for(
        "a run to start",
        Duration::from_secs(10),
        Duration::from_millis(1),
        || async {
            let started: bool = db
                .client
                .query_one(
                    "select started_at is not null from spool.runs where id = $1",
                    &[&id],
                )
                .await?
                .get(0);
            Ok(started.then_some(()))
        },
    )
    .await
}

/// What one attacher saw.
struct Seen {
    chunks: u64,
    first_chunk: Option<Instant>,
    /// When the last chunk or the end arrived.
    last: Option<Instant>,
    end: Option<Instant>,
    /// Every chunk so far was the next tick (`tick-1`, `tick-2`, …): none lost, repeated or out
    /// of order.
    in_order: bool,
    /// Events other than `chunk` and the end (`reset`, `unavailable`).
    other: Vec<String>,
    /// Why the stream stopped before its end event: an error, or the bench's deadline.
    stopped: Option<String>,
}

/// 6c and 8b: `attachers` clients attach to a run held in a queue nobody serves (8b: the RSS they
/// add while idle), then the run is moved to `default` and streams `fanout_count` chunks, one
/// every millisecond (6c: chunks delivered per second across all clients, and the peak RSS).
async fn fan_out(live: &LiveCluster, p: &ChunkParams) -> Vec<Row> {
    match fan_out_inner(live, p).await {
        Ok(rows) => rows,
        Err(e) => vec![
            Row::failed(6, format!("6c {} attachers on one run", p.attachers), &e),
            Row::failed(8, "8b RSS per idle attacher", &e),
        ],
    }
}

async fn fan_out_inner(live: &LiveCluster, p: &ChunkParams) -> Result<Vec<Row>> {
    let n = p.attachers;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = live.api.rss_bytes()?;
    let id = live.insert_ticker("held", p.fanout_count, 1).await?;
    let mut attachers = attach_all(live, &id, n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let every attacher settle (consumers made)
    let rss_idle = live.api.rss_bytes()?;

    let peak = Arc::new(AtomicU64::new(rss_idle));
    let sampler = tokio::spawn(sample_peak_rss(live.api.pid(), peak.clone()));
    let _sampler = AbortOnDrop(sampler.abort_handle());
    live.db
        .client
        .execute(
            "update spool.runs set queue = 'default' where id = $1",
            &[&id],
        )
        .await?;
    // every attacher stops at its deadline at the latest
    let mut seen = Vec::with_capacity(n);
    while let Some(r) = attachers.join_next().await {
        seen.push(r??);
    }
    let peak = peak.load(Ordering::Relaxed);

    let total: u64 = seen.iter().map(|s| s.chunks).sum();
    let complete = seen
        .iter()
        .filter(|s| s.in_order && s.chunks == p.fanout_count as u64 && s.end.is_some())
        .count();
    let incomplete = describe_incomplete(&seen, p.fanout_count as u64);
    let first = seen
        .iter()
        .filter_map(|s| s.first_chunk)
        .min()
        .context("no chunk delivered")?;
    let last = seen
        .iter()
        .filter_map(|s| s.last)
        .max()
        .context("no chunk delivered")?;
    let delivery = (last - first).as_secs_f64();
    let run_secs: f64 = live
        .db
        .client
        .query_one(
            "select extract(epoch from finished_at - started_at)::float8 from spool.runs where id = $1",
            &[&id],
        )
        .await?
        .get(0);
    let added = rss_idle.saturating_sub(rss_before) as f64;
    let mb = |b: f64| b / 1048576.0;
    Ok(vec![
        Row::new(6, format!("6c {n} attachers on one run: chunks delivered"), total as f64 / delivery, Unit::PerSec("chunks"))
            .note(format!(
                "{} chunks each; the run took {run_secs:.1} s, delivery {delivery:.1} s; warnings logged by the API: {}",
                p.fanout_count,
                live.api.warnings()
            )),
        Row::new(6, "6c attachers that got every chunk exactly once, in order, then the end", complete as f64, Unit::Plain(""))
            .target(Target::AtLeast(n as f64))
            .note(format!("of {n}{incomplete}")),
        Row::new(6, format!("6c API process RSS, peak while streaming to {n}"), peak as f64, Unit::Bytes)
            .note(format!("{:.1} MB before attaching", mb(rss_before as f64))),
        Row::new(8, "8b RSS per idle attacher", added / n as f64, Unit::Bytes)
            .target(Target::AtMost(64.0 * 1024.0))
            .note(format!("{n} idle attachers added {:.1} MB", mb(added))),
    ])
}

/// How long the attachers of 6c may take, from the first attach to their end event.
const FAN_OUT_LIMIT: Duration = Duration::from_secs(90);

/// Attaches `n` clients to `run_id` and waits until the server admitted every one of them. Each
/// task then reads its stream to the end (or `FAN_OUT_LIMIT`) and returns what it saw.
async fn attach_all(live: &LiveCluster, run_id: &str, n: usize) -> Result<JoinSet<Result<Seen>>> {
    let deadline = Instant::now() + FAN_OUT_LIMIT;
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let base = live.api.url("");
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let (http, base, id) = (live.http.clone(), base.clone(), run_id.to_string());
        let (connected, failed) = (connected.clone(), failed.clone());
        tasks.spawn(async move {
            let mut stream = match sse::attach(&http, &base, &id).await {
                Ok(s) => s,
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            Ok(read_to_end(&mut stream, deadline).await)
        });
    }
    let wait = wait_for(
        "every attacher to connect",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || async {
            ensure!(
                failed.load(Ordering::Relaxed) == 0,
                "an attacher was refused"
            );
            Ok((connected.load(Ordering::Relaxed) >= n).then_some(()))
        },
    )
    .await;
    if wait.is_err() && failed.load(Ordering::Relaxed) > 0 {
        // the first refusal says why
        while let Some(r) = tasks.join_next().await {
            r??;
        }
    }
    wait?;
    Ok(tasks)
}

/// Reads a stream until its end event, an error, or `deadline`.
async fn read_to_end(stream: &mut sse::SseStream, deadline: Instant) -> Seen {
    let mut seen = Seen {
        chunks: 0,
        first_chunk: None,
        last: None,
        end: None,
        in_order: true,
        other: Vec::new(),
        stopped: None,
    };
    loop {
        let e = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                seen.stopped = Some(format!("{e:#}"));
                break;
            }
            Err(_) => {
                seen.stopped = Some("the bench's deadline".into());
                break;
            }
        };
        if e.kind == "chunk" {
            seen.chunks += 1;
            seen.first_chunk.get_or_insert_with(Instant::now);
            seen.last = Some(Instant::now());
            // a chunk's data is a JSON string on the wire
            let tick = serde_json::from_str::<String>(&e.data)
                .ok()
                .and_then(|text| text.strip_prefix("tick-")?.parse::<u64>().ok());
            seen.in_order &= tick == Some(seen.chunks);
        } else if e.is_end() {
            seen.end = Some(Instant::now());
            seen.last = seen.end;
            break;
        } else {
            seen.other.push(e.kind);
        }
    }
    seen
}

/// Records the highest VmRSS of `pid` into `peak`, every 50 ms, until aborted.
async fn sample_peak_rss(pid: u32, peak: Arc<AtomicU64>) {
    loop {
        if let Ok(rss) = rss_bytes(pid) {
            peak.fetch_max(rss, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What went wrong for the attachers that did not see every chunk exactly once, in order, and
/// then the end, and which other events they saw, as "; "-prefixed parts ("" when none).
fn describe_incomplete(seen: &[Seen], count: u64) -> String {
    let cut = seen
        .iter()
        .filter(|s| s.end.is_none() && s.stopped.is_none())
        .count();
    let short = seen
        .iter()
        .filter(|s| s.end.is_some() && s.chunks < count)
        .count();
    let long = seen.iter().filter(|s| s.chunks > count).count();
    let disordered = seen
        .iter()
        .filter(|s| !s.in_order && s.chunks <= count)
        .count();
    let mut out = String::new();
    for (n, what) in [
        (cut, "closed without an end event"),
        (short, "got the end event short of chunks"),
        (long, "got extra chunks"),
        (disordered, "got chunks out of order"),
    ] {
        if n > 0 {
            out.push_str(&format!("; {n} {what}"));
        }
    }
    let stopped: Vec<&String> = seen.iter().filter_map(|s| s.stopped.as_ref()).collect();
    if let Some(first) = stopped.first() {
        out.push_str(&format!(
            "; {} stopped early (first: {first})",
            stopped.len()
        ));
    }
    let mut kinds: Vec<&str> = seen
        .iter()
        .flat_map(|s| s.other.iter().map(String::as_str))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    for kind in kinds {
        let n = seen
            .iter()
            .filter(|s| s.other.iter().any(|k| k == kind))
            .count();
        out.push_str(&format!("; {n} also got `{kind}`"));
    }
    out
}
