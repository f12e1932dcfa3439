//! Section 8 — Node death: an executor whose host dies without a FIN.
//!
//! Executor A reaches Postgres through a TCP relay (tests/common/relay.rs). Mid-run, the relay
//! is black-holed (nothing forwarded, no close passed on: the server keeps A's sessions, and its
//! lock, as it would for a dead host) and A is SIGKILLed. A client stays attached through an
//! API-only process. Measured from the fault to the attacher's first chunk after `reset`:
//!
//! - takeover: survivor B adopts the run (`SPOOL_LEASE_MS=2000`, `SPOOL_TAKEOVER_AFTER_MS=2000`);
//! - same id: a new process with A's id starts at once, ends the stale session once A's lease has
//!   expired and replays the run (takeover off, `SPOOL_LEASE_MS=2000`);
//! - defaults: takeover with the default lease (10 s) and takeover delay (30 s), one trial.
//!
//! Every trial also checks that nothing A wrote after the fault was accepted and that the
//! attacher saw every chunk after the reset exactly once.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::harness::{ms, quantile, wait_for, AbortOnDrop, Bench, Db, ProcSpec, Role};
use crate::relay::Relay;
use crate::report::{Row, Target, Unit};
use crate::sse;

pub struct NodeDeathParams {
    pub trials: usize,
    /// Run the one trial at the default lease and takeover delay (about 45 s).
    pub defaults: bool,
}

/// Which recovery a trial measures.
#[derive(Clone, Copy)]
enum Recovery {
    /// A survivor adopts the run: lease and takeover delay in ms.
    Takeover { lease_ms: u64, takeover_ms: u64 },
    /// The same id comes back at once (takeover off): lease in ms.
    SameId { lease_ms: u64 },
}

pub async fn measure(bench: &Bench, p: &NodeDeathParams) -> Vec<Row> {
    let mut rows = Vec::new();
    let cases = [
        (
            format!(
                "black-holed executor → first resumed chunk on a survivor, lease 2 s + takeover 2 s ({} trials, p99)",
                p.trials
            ),
            Recovery::Takeover {
                lease_ms: 2000,
                takeover_ms: 2000,
            },
            p.trials,
            5000.0,
        ),
        (
            format!(
                "black-holed executor → same id restarted → first replayed chunk, lease 2 s ({} trials, p99)",
                p.trials
            ),
            Recovery::SameId { lease_ms: 2000 },
            p.trials,
            3000.0,
        ),
    ];
    for (figure, recovery, trials, target) in cases {
        rows.push(match trials_of(bench, recovery, trials).await {
            Ok(samples) => Row::new(8, figure, quantile(&samples, 0.99), Unit::Ms)
                .target(Target::AtMost(target))
                .note(format!(
                    "p50 {:.0} ms, max {:.0} ms; zero stale writes accepted, every chunk once",
                    quantile(&samples, 0.5),
                    quantile(&samples, 1.0)
                )),
            Err(e) => Row::failed(8, figure, &e),
        });
    }
    if p.defaults {
        let figure = "black-holed executor → first resumed chunk on a survivor, defaults (lease 10 s, takeover 30 s)".to_string();
        let recovery = Recovery::Takeover {
            lease_ms: 10_000,
            takeover_ms: 30_000,
        };
        rows.push(match trials_of(bench, recovery, 1).await {
            Ok(samples) => Row::new(8, figure, samples[0], Unit::Ms)
                .target(Target::AtMost(45_000.0))
                .note("one trial; the id never returns"),
            Err(e) => Row::failed(8, figure, &e),
        });
    }
    rows
}

async fn trials_of(bench: &Bench, recovery: Recovery, trials: usize) -> Result<Vec<f64>> {
    let db = bench.fresh_db("bench_node_death").await?;
    let api = bench
        .start(
            &db,
            ProcSpec::new("bench-nd-api", Role::Api).with_nats("bench_nd"),
        )
        .await?;
    let pg: SocketAddr = pg_addr(bench)?;
    let mut samples = Vec::new();
    for trial in 0..trials {
        samples.push(
            one_trial(bench, &db, &api.url(""), pg, recovery, trial)
                .await
                .with_context(|| format!("trial {trial}"))?,
        );
    }
    Ok(samples)
}

fn pg_addr(bench: &Bench) -> Result<SocketAddr> {
    let url = url::Url::parse(&bench.pg_base)?;
    let host = url.host_str().context("pg host")?;
    let port = url.port().context("pg port")?;
    Ok(format!("{host}:{port}").parse()?)
}

async fn one_trial(
    bench: &Bench,
    db: &Db,
    api: &str,
    pg: SocketAddr,
    recovery: Recovery,
    trial: usize,
) -> Result<f64> {
    let relay = Relay::start(pg).await;
    let a_id = format!("bench-nd-a{trial}");
    let (lease_ms, takeover_ms) = match recovery {
        Recovery::Takeover {
            lease_ms,
            takeover_ms,
        } => (lease_ms, takeover_ms),
        Recovery::SameId { lease_ms } => (lease_ms, 0),
    };
    let settings = |spec: ProcSpec| {
        spec.with_nats("bench_nd")
            .env("SPOOL_LEASE_MS", lease_ms.to_string())
            .env("SPOOL_TAKEOVER_AFTER_MS", takeover_ms.to_string())
    };
    let through_relay = format!(
        "postgres://postgres@127.0.0.1:{}/{}?sslmode=disable",
        relay.port(),
        db.name
    );
    let a_spec = settings(ProcSpec::new(&a_id, Role::Worker)).env("DATABASE_URL", &through_relay);
    let mut a = bench.start(db, a_spec).await?;
    let id: String = db
        .client
        .query_one(
            r#"insert into spool.runs (workflow, input)
               values ('ticker', '{"count": 40, "interval_ms": 100, "steps": 40}') returning id"#,
            &[],
        )
        .await?
        .get(0);
    wait_for(
        "the run to record 2 steps on A",
        Duration::from_secs(20),
        Duration::from_millis(5),
        || async {
            let n: i64 = db
                .client
                .query_one(
                    "select count(*) from spool.operation_outputs where run_id = $1",
                    &[&id],
                )
                .await?
                .get(0);
            Ok((n >= 2).then_some(()))
        },
    )
    .await?;
    let http = reqwest::Client::new();
    let mut stream = sse::attach(&http, api, &id).await?;
    // the attacher notes when the first chunk after a reset arrives, and checks that every chunk
    // after it arrives once, in order
    let watcher = tokio::spawn(async move {
        let mut first: Option<Instant> = None;
        let mut after_reset: Vec<String> = Vec::new();
        while let Some(e) = stream.next().await? {
            match e.kind.as_str() {
                "reset" => {
                    after_reset.clear();
                    first = None;
                }
                "chunk" => {
                    if first.is_none() {
                        first = Some(Instant::now());
                    }
                    after_reset.push(e.data);
                }
                _ if e.is_end() => break,
                _ => {}
            }
        }
        let expected: Vec<String> = (1..=40).map(|i| format!("\"tick-{i}\"")).collect();
        ensure!(
            after_reset == expected,
            "the attacher saw {} chunks after the last reset, not tick-1..tick-40 once each",
            after_reset.len()
        );
        first.context("no chunk")
    });
    let _abort_watcher = AbortOnDrop(watcher.abort_handle());
    let survivor = match recovery {
        Recovery::Takeover { .. } => Some(
            bench
                .start(
                    db,
                    settings(ProcSpec::new(format!("bench-nd-b{trial}"), Role::Worker)),
                )
                .await?,
        ),
        Recovery::SameId { .. } => None,
    };

    // The host dies without a word.
    relay.black_hole();
    a.signal(Signal::SIGKILL)?;
    let fault = Instant::now();
    a.wait_exit(Duration::from_secs(5)).await?;
    let restarted = match recovery {
        Recovery::SameId { .. } => Some(
            bench
                .spawn(db, settings(ProcSpec::new(&a_id, Role::Worker)))
                .context("restart the same id")?,
        ),
        Recovery::Takeover { .. } => None,
    };
    let limit = Duration::from_millis(lease_ms + takeover_ms) + Duration::from_secs(30);
    let first = tokio::time::timeout(limit, watcher)
        .await
        .context("no resumed chunk in time")???;
    let sample = ms(first.saturating_duration_since(fault));

    wait_for(
        "the run to succeed",
        Duration::from_secs(30),
        Duration::from_millis(10),
        || async {
            let s: String = db
                .client
                .query_one("select status from spool.runs where id = $1", &[&id])
                .await?
                .get(0);
            Ok((s == "succeeded").then_some(()))
        },
    )
    .await?;
    let stale: i64 = db
        .client
        .query_one(
            "select count(*) from spool.operation_outputs o join spool.runs r on r.id = o.run_id
              where o.run_id = $1 and o.claim_epoch = 1
                and o.finished_at > now() - make_interval(secs => $2::float8 / 1000)",
            &[&id, &(ms(fault.elapsed()))],
        )
        .await?
        .get(0);
    ensure!(
        stale == 0,
        "{stale} steps of the dead executor were accepted after the fault"
    );
    if let Some(p) = survivor {
        p.stop().await?;
    }
    if let Some(p) = restarted {
        p.stop().await?;
    }
    drop(relay);
    Ok(sample)
}
