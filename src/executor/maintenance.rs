//! Periodic maintenance that one executor at a time does, each under its own lease in
//! `spool.maintenance_leases`:
//! - `metrics`: reading the database's metrics (queue depth and oldest ready age, runs nobody can
//!   execute, executors and their lease age) once per interval; the holder serves
//!   them at its `/metrics`, so a scrape of every executor counts each once;
//! - `retention`: deleting runs finished longer ago than their queue's retention, with their
//!   steps.
//!
//! Retention walks the table in enqueue order, [`PURGE_WINDOW`] runs per statement (one short
//! transaction each), from where it stopped, deleting the expired ones; no index on `finished_at`
//! is needed, so finishing a run costs nothing extra. A sweep ends at the end of the table or at
//! runs too young to have expired (created within the shortest retention); the next sweep starts
//! from the beginning [`SWEEP_PAUSE`] later. A round stops after [`PURGE_BUDGET`] and the next
//! round continues the sweep, so a large backlog drains over several rounds without holding locks
//! or a connection for long. While runs are executing anywhere, deletion yields to them: after
//! each window that deleted something it pauses [`BUSY_PAUSE_FACTOR`] times as long as the
//! window took, so it uses about a tenth of one database connection's time; an old backlog then
//! goes fastest when the queue is quiet. It runs beside the control loop, on the executor's pool,
//! and never touches an unfinished run.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{jittered, Metrics};
use crate::db::{maintenance, stats};

/// Runs looked at (and at most deleted) per statement.
pub const PURGE_WINDOW: i32 = 1000;
/// After a sweep reaches its end, the next one starts this much later.
const SWEEP_PAUSE: Duration = Duration::from_secs(60);
/// Longest a retention round keeps deleting before it yields to the next round.
const PURGE_BUDGET: Duration = Duration::from_secs(2);
/// While runs execute, each batch is followed by a pause this many times its own duration.
const BUSY_PAUSE_FACTOR: u32 = 9;

pub(super) struct Maintenance {
    pub pool: Pool,
    pub executor_id: String,
    /// `None`: finished runs are kept.
    pub retention: Option<Duration>,
    pub interval: Duration,
    pub metrics: Arc<Metrics>,
}

/// Where the retention walk stands.
#[derive(Debug, Default)]
struct Sweep {
    /// The last enqueue_seq looked at in this sweep.
    cursor: i64,
    /// When the next sweep may start (after one reached its end).
    next_sweep: Option<Instant>,
}

impl Maintenance {
    pub async fn run(self, stop: CancellationToken) {
        let mut sweep = Sweep::default();
        loop {
            if let Err(e) = self.metrics_round().await {
                *self.metrics.db_snapshot.lock().unwrap() = None;
                tracing::warn!(error = %e, "cannot read the database's metrics; will retry");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.interval)) => {}
            }
            if let Some(retention) = self.retention {
                if let Err(e) = self.retention_round(retention, &mut sweep, &stop).await {
                    tracing::warn!(error = %e, "retention round failed; will retry");
                }
            }
        }
    }

    /// Reads the database's metrics when this process holds the `metrics` lease, and stops
    /// serving them when it does not.
    async fn metrics_round(&self) -> Result<(), crate::db::DbError> {
        let client = self.pool.get().await?;
        let held = maintenance::try_lease(&client, "metrics", &self.executor_id, self.interval * 3)
            .await?;
        let text = if held {
            // one snapshot for every family: read separately, a reading could count a run
            // ready in one family and miss the runs inserted with it in the next
            client
                .batch_execute("begin isolation level repeatable read read only")
                .await
                .map_err(crate::db::DbError::from_pg)?;
            let collected = stats::collect(&client).await;
            let end = if collected.is_ok() {
                "commit"
            } else {
                "rollback"
            };
            client
                .batch_execute(end)
                .await
                .map_err(crate::db::DbError::from_pg)?;
            Some(render(&collected?))
        } else {
            None
        };
        *self.metrics.db_snapshot.lock().unwrap() = text;
        Ok(())
    }

    async fn retention_round(
        &self,
        retention: Duration,
        sweep: &mut Sweep,
        stop: &CancellationToken,
    ) -> Result<(), crate::db::DbError> {
        let client = self.pool.get().await?;
        let ttl = self.interval * 3;
        // the holder keeps renewing between sweeps, so the walk stays with one executor
        if !maintenance::try_lease(&client, "retention", &self.executor_id, ttl).await? {
            *sweep = Sweep::default();
            return Ok(());
        }
        if sweep.next_sweep.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let young = maintenance::shortest_retention(&client, retention).await?;
        let started = Instant::now();
        let mut purged = 0u64;
        while !stop.is_cancelled() && started.elapsed() < PURGE_BUDGET {
            let busy = self.metrics.in_flight.load(Ordering::Relaxed) > 0
                || maintenance::any_running(&client).await?;
            let window_started = Instant::now();
            let w =
                maintenance::purge_finished_window(&client, retention, sweep.cursor, PURGE_WINDOW)
                    .await?;
            purged += w.purged as u64;
            self.metrics
                .purged
                .fetch_add(w.purged as u64, Ordering::Relaxed);
            let reached_young = w.last_age.is_some_and(|age| age < young.as_secs_f64());
            match w.last_seq {
                Some(seq) if !reached_young => sweep.cursor = seq,
                _ => {
                    // the end of the table, or runs too young to have expired: sweep again later
                    *sweep = Sweep {
                        cursor: 0,
                        next_sweep: Some(Instant::now() + SWEEP_PAUSE.min(young)),
                    };
                    break;
                }
            }
            if busy && w.purged > 0 {
                // yield to the runs executing (a pause, not a poll)
                tokio::time::sleep(window_started.elapsed() * BUSY_PAUSE_FACTOR).await;
            }
        }
        if purged > 0 {
            tracing::info!(runs = purged, "retention deleted finished runs");
        }
        Ok(())
    }
}

/// The database's metrics as Prometheus text (gauges; label values are names Spool validates:
/// letters, digits and `_.:-`, nothing to escape).
fn render(s: &stats::DbStats) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let q = |queue: &str| format!("{{queue=\"{queue}\"}}");
    family(
        "spool_queue_ready_runs",
        "Queued runs whose run_at has come, per queue",
        s.queues
            .iter()
            .map(|d| (q(&d.queue), d.ready.to_string()))
            .collect(),
    );
    family(
        "spool_queue_scheduled_runs",
        "Queued runs whose run_at is still ahead, per queue",
        s.queues
            .iter()
            .map(|d| (q(&d.queue), d.scheduled.to_string()))
            .collect(),
    );
    family(
        "spool_queue_running_runs",
        "Runs executing, per queue",
        s.queues
            .iter()
            .map(|d| (q(&d.queue), d.running.to_string()))
            .collect(),
    );
    family(
        "spool_queue_oldest_ready_age_seconds",
        "How long the oldest ready run of the queue has waited since its run_at",
        s.queues
            .iter()
            .map(|d| (q(&d.queue), format!("{:.3}", d.oldest_ready_age)))
            .collect(),
    );
    family(
        "spool_queue_unrunnable_runs",
        "Unfinished runs no live executor can execute now (see spool.unrunnable_runs for why)",
        s.unrunnable
            .iter()
            .map(|(queue, n)| (q(queue), n.to_string()))
            .collect(),
    );
    family(
        "spool_executors_alive",
        "Executors holding their lock with an unexpired lease",
        vec![(
            String::new(),
            s.executors.iter().filter(|e| e.alive).count().to_string(),
        )],
    );
    let e = |id: &str| format!("{{executor=\"{id}\"}}");
    family(
        "spool_executor_up",
        "1 when the executor is alive (lock held, lease unexpired), else 0; executors stopped over an hour ago are left out",
        s.executors.iter().map(|x| (e(&x.id), u8::from(x.alive).to_string())).collect(),
    );
    family(
        "spool_executor_heartbeat_age_seconds",
        "Time since the executor last renewed its lease",
        s.executors
            .iter()
            .map(|x| (e(&x.id), format!("{:.3}", x.heartbeat_age)))
            .collect(),
    );
    family(
        "spool_executor_running_runs",
        "Runs the executor owns that are running",
        s.executors
            .iter()
            .map(|x| (e(&x.id), x.running.to_string()))
            .collect(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    family(
        "spool_db_metrics_collected_timestamp_seconds",
        "When this process last read the database's metrics (it holds the metrics lease)",
        vec![(String::new(), format!("{now:.3}"))],
    );
    out
}
