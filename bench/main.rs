//! `just bench`: Spool's figures next to the raw SQL ceiling of the same cluster, in one table.
//!
//! `scripts/bench.sh` builds the release binaries, starts a private PostgreSQL (durable
//! settings) and a private nats-server, and runs this program with their URLs. Every section
//! gets its own fresh database, migrated with `spool migrate`, and starts its own `spool serve`
//! processes, which are killed when the section ends (also on error or panic). The table is
//! printed and written, with a description of the machine, to `bench/results.md`.

mod ceiling;
mod chat;
mod chunks;
mod claim_load;
mod enqueue;
mod harness;
mod latency;
mod machine;
mod memory;
mod node_death;
mod peer;
mod recovery;
/// The fault relay of the test harness (black-holes a host's connections).
#[path = "../tests/common/relay.rs"]
#[allow(dead_code)] // the bench uses only the black hole
mod relay;
mod report;
mod retention;
mod scale;
mod sse;
mod throughput;
mod versus;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

use ceiling::{Ceiling, CeilingParams};
use chunks::ChunkParams;
use claim_load::ClaimLoadParams;
use enqueue::EnqueueParams;
use harness::{Bench, SpoolSettings};
use node_death::NodeDeathParams;
use peer::PeerParams;
use recovery::RecoveryParams;
use report::Row;
use retention::RetentionParams;
use throughput::ThroughputParams;

/// Sections, in the order they run (the table is ordered by figure number).
const SECTIONS: [&str; 14] = [
    "ceiling",
    "noop",
    "enqueue",
    "steps",
    "latency",
    "memory",
    "chunks",
    "recovery",
    "nodedeath",
    "scale",
    "chat",
    "retention",
    "peer",
    "claimload",
];

#[derive(Debug, Parser)]
#[command(
    about = "Spool benchmarks against a private PostgreSQL and nats-server (see scripts/bench.sh)"
)]
struct Args {
    /// PostgreSQL server URL without a database, e.g. postgres://postgres@127.0.0.1:5432.
    #[arg(long, env = "BENCH_PG")]
    pg: String,
    /// nats-server URL (JetStream enabled).
    #[arg(long, env = "BENCH_NATS")]
    nats: String,
    /// The `spool` binary under test.
    #[arg(long, env = "BENCH_SPOOL_BIN", default_value = "target/release/spool")]
    spool_bin: PathBuf,
    /// Logs and pid files of the Spool processes.
    #[arg(long, env = "BENCH_WORK_DIR", default_value = "target/bench")]
    work_dir: PathBuf,
    /// Where the table and the machine description are written.
    #[arg(long, env = "BENCH_OUT", default_value = "bench/results.md")]
    out: PathBuf,
    /// The code under test, as recorded when it was built (default: asks git now).
    #[arg(long, env = "BENCH_COMMIT")]
    commit: Option<String>,
    /// Comma-separated sections to run (default: all): ceiling, noop, enqueue, steps, latency,
    /// memory, chunks, recovery, nodedeath, scale, chat, retention, peer, claimload.
    #[arg(long, env = "BENCH_ONLY", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// SPOOL_CONCURRENCY of the executors.
    #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = 2048)]
    concurrency: usize,
    /// SPOOL_CLAIM_BATCH of the executors.
    #[arg(long, env = "BENCH_CLAIM_BATCH", default_value_t = 512)]
    claim_batch: usize,
    /// Server settings for every section's database, separated by `;` (each applied with
    /// `alter database … set`), e.g. `plan_cache_mode=force_custom_plan`. Default: none.
    #[arg(long, env = "BENCH_DB_SETTINGS", value_delimiter = ';')]
    db_settings: Vec<String>,
    /// RUST_LOG of the Spool processes (default: unset, Spool's own default).
    #[arg(long, env = "BENCH_SPOOL_LOG")]
    spool_log: Option<String>,
    /// Rows of the claim-and-complete ceiling.
    #[arg(long, env = "BENCH_CEILING_ROWS", default_value_t = 100_000)]
    ceiling_rows: i64,
    /// Seconds of each single-row commit measurement (ceiling and enqueue).
    #[arg(long, env = "BENCH_COMMIT_SECS", default_value_t = 3.0)]
    commit_secs: f64,
    /// No-op runs per drain.
    #[arg(long, env = "BENCH_NOOP_RUNS", default_value_t = 50_000)]
    noop_runs: i64,
    /// Runs of 10 steps.
    #[arg(long, env = "BENCH_STEP_RUNS", default_value_t = 20_000)]
    step_runs: i64,
    /// Longest a drain may take, in seconds, before it is reported as timed out.
    #[arg(long, env = "BENCH_DRAIN_LIMIT_SECS", default_value_t = 90)]
    drain_limit_secs: u64,
    /// HTTP enqueues and their concurrent clients.
    #[arg(long, env = "BENCH_HTTP_RUNS", default_value_t = 5_000)]
    http_runs: usize,
    #[arg(long, env = "BENCH_HTTP_CLIENTS", default_value_t = 16)]
    http_clients: usize,
    /// Sequential runs of the enqueue → start latency.
    #[arg(long, env = "BENCH_LATENCY_RUNS", default_value_t = 1_000)]
    latency_runs: usize,
    /// Concurrent ticker runs of the publish rate, and chunks in each.
    #[arg(long, env = "BENCH_PUBLISH_RUNS", default_value_t = 20)]
    publish_runs: i64,
    #[arg(long, env = "BENCH_PUBLISH_CHUNKS", default_value_t = 20_000)]
    publish_chunks: i64,
    /// Samples of attach → first chunk.
    #[arg(long, env = "BENCH_ATTACH_SAMPLES", default_value_t = 50)]
    attach_samples: usize,
    /// Clients attached to one run, and that run's chunks (one per millisecond).
    #[arg(long, env = "BENCH_ATTACHERS", default_value_t = 1_000)]
    attachers: usize,
    #[arg(long, env = "BENCH_FANOUT_CHUNKS", default_value_t = 2_000)]
    fanout_chunks: i64,
    /// Trials of each recovery figure.
    #[arg(long, env = "BENCH_RECOVERY_TRIALS", default_value_t = 5)]
    recovery_trials: usize,
    /// SPOOL_GRACE_PERIOD_MS of the executor that gets SIGTERM.
    #[arg(long, env = "BENCH_GRACE_MS", default_value_t = 200)]
    grace_ms: u64,
    /// Trials of each node-death figure (black-holed executor, short lease).
    #[arg(long, env = "BENCH_NODE_DEATH_TRIALS", default_value_t = 20)]
    node_death_trials: usize,
    /// Old finished runs deleted by retention beside a drain (section 12).
    #[arg(long, env = "BENCH_RETENTION_BACKLOG", default_value_t = 1_000_000)]
    retention_backlog: i64,
    /// Length of the retention soak in seconds, and no-op runs per soak round.
    #[arg(long, env = "BENCH_SOAK_SECS", default_value_t = 180)]
    soak_secs: u64,
    #[arg(long, env = "BENCH_SOAK_RUNS", default_value_t = 10_000)]
    soak_runs: i64,
    /// Ready no-op runs drained in each case of the claim-under-load section (14), and the loads:
    /// ready runs behind them, runs scheduled for tomorrow, runs waiting behind one busy key.
    #[arg(long, env = "BENCH_CLAIMLOAD_RUNS", default_value_t = 20_000)]
    claimload_runs: i64,
    #[arg(long, env = "BENCH_CLAIMLOAD_BACKLOG", default_value_t = 200_000)]
    claimload_backlog: i64,
    #[arg(long, env = "BENCH_CLAIMLOAD_SCHEDULED", default_value_t = 500_000)]
    claimload_scheduled: i64,
    #[arg(long, env = "BENCH_CLAIMLOAD_KEY_WAITING", default_value_t = 100_000)]
    claimload_key_waiting: i64,
    /// Rounds of the four claim-under-load cases (each figure is the median).
    #[arg(long, env = "BENCH_CLAIMLOAD_ROUNDS", default_value_t = 3)]
    claimload_rounds: usize,
    /// Also run one node death at the default lease and takeover delay (about 45 s).
    #[arg(long, env = "BENCH_NODE_DEATH_DEFAULTS", default_value_t = true, action = clap::ArgAction::Set)]
    node_death_defaults: bool,
}

impl Args {
    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s.trim() == section))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(only) = &args.only {
        if let Some(bad) = only.iter().find(|s| !SECTIONS.contains(&s.trim())) {
            eprintln!(
                "bench: unknown section {bad:?}; sections: {}",
                SECTIONS.join(", ")
            );
            return ExitCode::FAILURE;
        }
    }
    let started = Instant::now();
    let load_at_start = machine::load_average();
    // Ctrl-C or SIGTERM drops the running section, whose guards kill its processes.
    let rows = tokio::select! {
        rows = run(&args) => rows,
        _ = shutdown_signal() => {
            eprintln!("bench: interrupted");
            return ExitCode::FAILURE;
        }
    };
    let elapsed = started.elapsed();
    let table = report::table(&rows);
    let versus = versus::table(&rows, &["14"]);
    println!("\n{versus}\n{table}");
    println!("bench took {}", minutes(elapsed));
    let bench = bench_of(&args);
    let text = results_markdown(
        &machine::describe(&bench, args.commit.as_deref(), &load_at_start).await,
        &versus,
        &table,
        elapsed,
    );
    if let Err(e) = std::fs::write(&args.out, text) {
        eprintln!("bench: cannot write {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("written to {}", args.out.display());
    if rows.iter().any(|r| r.value.is_err()) {
        eprintln!("bench: some figures could not be measured (FAILED rows above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn bench_of(args: &Args) -> Bench {
    Bench {
        pg_base: args.pg.trim_end_matches('/').to_string(),
        nats_url: args.nats.clone(),
        spool_bin: args.spool_bin.clone(),
        work_dir: args.work_dir.clone(),
        spool: SpoolSettings {
            concurrency: args.concurrency,
            claim_batch: args.claim_batch,
            log: args.spool_log.clone(),
        },
        db_settings: args
            .db_settings
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    }
}

/// Runs the wanted sections in order; a section that fails yields FAILED rows, and the next one
/// still runs.
async fn run(args: &Args) -> Vec<Row> {
    let bench = bench_of(args);
    let mut rows = Vec::new();
    let mut ceiling = Ceiling {
        claim_complete: 0.0,
        commits_16: 0.0,
    };
    let throughput = ThroughputParams {
        noop_runs: args.noop_runs,
        step_runs: args.step_runs,
        drain_limit: Duration::from_secs(args.drain_limit_secs),
    };
    for section in SECTIONS {
        if !args.wants(section) {
            continue;
        }
        let t = Instant::now();
        eprintln!("bench: {section} ...");
        let new_rows = match section {
            "ceiling" => {
                let p = CeilingParams {
                    claim_rows: args.ceiling_rows,
                    commit_secs: args.commit_secs,
                };
                match ceiling::measure(&bench, &p).await {
                    Ok((c, r)) => {
                        ceiling = c;
                        r
                    }
                    Err(e) => vec![Row::failed(1, "ceiling", &e)],
                }
            }
            "noop" => throughput::noop(&bench, &throughput, &ceiling).await,
            "enqueue" => {
                let p = EnqueueParams {
                    http_runs: args.http_runs,
                    http_clients: args.http_clients,
                    sql_secs: args.commit_secs,
                };
                enqueue::measure(&bench, &p, &ceiling).await
            }
            "steps" => throughput::steps(&bench, &throughput, &ceiling).await,
            "latency" => latency::measure(&bench, args.latency_runs).await,
            "chunks" => {
                let p = ChunkParams {
                    publish_runs: args.publish_runs,
                    publish_count: args.publish_chunks,
                    attach_samples: args.attach_samples,
                    attachers: args.attachers,
                    fanout_count: args.fanout_chunks,
                };
                chunks::measure(&bench, &p).await
            }
            "recovery" => {
                let p = RecoveryParams {
                    trials: args.recovery_trials,
                    grace_ms: args.grace_ms,
                };
                recovery::measure(&bench, &p).await
            }
            "memory" => memory::measure(&bench).await,
            "scale" => scale::measure(&bench).await,
            "chat" => chat::measure(&bench).await,
            "peer" => {
                let p = PeerParams {
                    runs: args.noop_runs,
                    latency_runs: args.latency_runs.min(200),
                };
                peer::measure(&bench, &p).await
            }
            "retention" => {
                let p = RetentionParams {
                    backlog: args.retention_backlog,
                    drain_runs: args.noop_runs,
                    soak_secs: args.soak_secs,
                    soak_runs: args.soak_runs,
                };
                retention::measure(&bench, &p).await
            }
            "nodedeath" => {
                let p = NodeDeathParams {
                    trials: args.node_death_trials,
                    defaults: args.node_death_defaults,
                };
                node_death::measure(&bench, &p).await
            }
            "claimload" => {
                let p = ClaimLoadParams {
                    runs: args.claimload_runs,
                    backlog: args.claimload_backlog,
                    scheduled: args.claimload_scheduled,
                    key_waiting: args.claimload_key_waiting,
                    rounds: args.claimload_rounds.max(1),
                    drain_limit: Duration::from_secs(args.drain_limit_secs),
                };
                claim_load::measure(&bench, &p).await
            }
            _ => unreachable!("SECTIONS lists every section"),
        };
        for r in &new_rows {
            let value = match &r.value {
                Ok(v) => report::format_value(*v, r.unit),
                Err(e) => format!("FAILED: {e}"),
            };
            eprintln!("  {}: {value}", r.figure);
        }
        eprintln!("bench: {section} took {:.1} s", t.elapsed().as_secs_f64());
        rows.extend(new_rows);
        match bench.settle().await {
            Ok(n) => eprintln!("bench: dropped the {n} databases of {section}"),
            Err(e) => eprintln!("bench: could not drop the databases of {section}: {e:#}"),
        }
    }
    let ratios = peer::ratios(&rows);
    rows.extend(ratios);
    rows
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{} min {:02} s", s / 60, s % 60)
}

fn results_markdown(machine: &str, versus: &str, table: &str, elapsed: Duration) -> String {
    format!(
        "# Spool benchmark results

Written by `just bench` (`scripts/bench.sh`, `bench/main.rs`); do not edit by hand. The bench
took {took} (measurements only, after the release build).

## Machine

{machine}
## Spool against the fastest peer

Every target, with Graphile Worker measured on the same cluster in the same run (section 13).

{versus}
## Results

Every figure is measured in a release build against a private PostgreSQL (durable settings) and
nats-server started by the bench; each section has its own fresh database, dropped when the
section ends (then a checkpoint), so no section pays for the autovacuum of another's tables. Ratios compare a Spool
figure with the raw SQL ceiling measured in the same run (section 1).

{table}
## How the figures are measured

1. **Ceiling** (`spool.runs` itself, no Spool process; best of 2 rounds). 1a: 100,000 queued
   `noop` rows inserted in one statement, then 2 clients each repeat one statement that locks 50
   rows in claim order (`FOR UPDATE SKIP LOCKED`) and sets them `succeeded`, until none is left.
   1b: one `insert into spool.runs` per transaction (wake-up trigger disabled), 1 and 16 clients.
   1c: the same 100,000 rows, 2 clients each repeating a claim of 512 rows to `running` (one
   committed statement) and their finish to `succeeded` (a second one): the two transitions a
   Spool run makes, with no fencing and no Spool process; rows/s, commits and WAL bytes per row
   (from a checkpoint before the insert to the end, by `pg_walinspect`).
2. **No-op drain**: 1, 2 or 4 idle `spool serve` processes, executor and API as deployed (and
   1 at Spool's defaults; and 1 at the defaults that idled 5 s on the empty queue first, as a
   deployed executor has, so its claim's plan was made for an empty queue), then the runs
   inserted in one statement. The bench learns that the drain ended from the processes'
   `/metrics` counters, not by querying the database. Runs/s = finished runs / (last `finished_at` − first `started_at`). Commits per
   run: `pg_stat_database.xact_commit` of the section's database, read after the executors
   exited, the bench's own statements subtracted. The two figures compared with Graphile
   Worker's (1 executor tuned, and at the defaults) are the median of 3 drains, as Graphile
   Worker's is; the WAL and commits shown are the median drain's.
3. **Enqueue**: HTTP `POST /v1/runs` against an `--api-only` process; SQL inserts from 16
   clients with the wake-up trigger on and off alternately (best of 3 rounds each), while a
   connection LISTENs for the wake-ups as an idle executor does.
4. **Steps**: `ticker` runs with `{{\"count\": 10, \"interval_ms\": 0, \"steps\": 10}}` (10
   memoized steps of one chunk each; no NATS, so the chunks go nowhere), drained like section 2,
   three times, each in a fresh database; steps/s = 10 × runs/s of the median drain.
5. **Latency**: one `noop` run inserted by SQL at a time on 1, 2 or 4 idle executors (a fresh
   database each), the next after the previous one finished; `started_at − created_at`, both
   `now()` of database transactions, so the bench's polling adds nothing.
6. **Chunks**: 6a: `ticker` runs (interval 0, one step) started together on one executor with
   NATS; total = all chunks / (last `finished_at` − first `started_at`), per run = count / the
   run's own duration (a run whose live output broke republishes it after it finished; the
   warnings count those). 6b: attach (SSE through an `--api-only` process) to a run streaming for
   30 ms, from sending the request to the first `chunk` event; and from the enqueue of a run to
   the first chunk at a client attached right after it. 6c: clients attached to a run held in a
   queue nobody serves, then released (2,000 chunks, one per millisecond); each client checks it
   got `tick-1` … `tick-N` in order, then the end; chunks received per second by all clients
   together; the API process's peak RSS (VmRSS, sampled every 50 ms).
7. **Recovery**: SIGKILL: a ticker of 10 one-chunk steps 100 ms apart, attached through an
   `--api-only` process, its executor SIGKILLed after 2 steps and restarted under the same id:
   from the restarted executor alive (`spool.executor_liveness`) to the first chunk after
   `reset`. SIGTERM: a run on executor A, an idle executor B; from SIGTERM to A to the run
   running on B. The bench polls the database every 2 ms.
8. **Memory**: 8a: VmRSS of a default `spool serve` (executor, API, NATS) 2 s after it came up,
   no work. 8b: VmRSS of the API process with the idle attachers of 6c connected, minus before,
   per attacher.
",
        took = minutes(elapsed),
    )
}
