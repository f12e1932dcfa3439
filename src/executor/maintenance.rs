//! Periodic maintenance that one executor at a time does: retention (deleting runs finished
//! longer ago than their queue's retention, with their steps).
//!
//! Every `maintenance_interval` (jittered) each executor asks for the `retention` lease
//! (`spool.maintenance_leases`, three intervals long); the one that holds it deletes in batches of
//! [`PURGE_BATCH`] runs, one statement (one short transaction) per batch, until a batch comes back
//! short or [`PURGE_BUDGET`] has passed, so a large backlog drains over several rounds without
//! holding locks or a connection for long. While runs are executing anywhere, deletion yields to
//! them: after each batch it pauses [`BUSY_PAUSE_FACTOR`] times as long as the batch took, so it
//! uses about a tenth of one database connection's time; an old backlog then goes fastest when
//! the queue is quiet. It runs beside the control loop, on the executor's pool, and never touches
//! an unfinished run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{jittered, Metrics};
use crate::db::maintenance;

/// Runs deleted per statement.
pub const PURGE_BATCH: i32 = 500;
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

impl Maintenance {
    pub async fn run(self, stop: CancellationToken) {
        let Some(retention) = self.retention else {
            return;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.interval)) => {}
            }
            if let Err(e) = self.retention_round(retention, &stop).await {
                tracing::warn!(error = %e, "retention round failed; will retry");
            }
        }
    }

    async fn retention_round(
        &self,
        retention: Duration,
        stop: &CancellationToken,
    ) -> Result<(), crate::db::DbError> {
        let client = self.pool.get().await?;
        let ttl = self.interval * 3;
        if !maintenance::try_lease(&client, "retention", &self.executor_id, ttl).await? {
            return Ok(());
        }
        let started = Instant::now();
        let mut purged = 0u64;
        while !stop.is_cancelled() && started.elapsed() < PURGE_BUDGET {
            let busy = self.metrics.in_flight.load(Ordering::Relaxed) > 0
                || maintenance::any_running(&client).await?;
            let batch_started = Instant::now();
            let n = maintenance::purge_finished_batch(&client, retention, PURGE_BATCH).await?;
            purged += n as u64;
            self.metrics.purged.fetch_add(n as u64, Ordering::Relaxed);
            if n < PURGE_BATCH {
                break;
            }
            if busy {
                // yield to the runs executing (a pause, not a poll)
                tokio::time::sleep(batch_started.elapsed() * BUSY_PAUSE_FACTOR).await;
            }
        }
        if purged > 0 {
            tracing::info!(runs = purged, "retention deleted finished runs");
        }
        Ok(())
    }
}
