//! Shutdown: the control loop's drain. In-flight runs get the grace period to finish; what is
//! left is released to the queue (a new claim epoch, the attempt given back) so any executor
//! continues it at once; a database that stops answering ends the releases early (the runs stay
//! owned and are recovered by the same id or adopted after the takeover delay).

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::ControlLoop;
use crate::db::runs;

impl ControlLoop {
    /// Graceful shutdown: no more claims; in-flight runs get the grace period; the rest are
    /// aborted and released to the queue so any executor continues them at once.
    pub(super) async fn drain(&mut self) {
        let deadline = Instant::now() + self.settings.grace_period;
        tracing::info!(in_flight = self.in_flight.len(), "draining");
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(done) = self.tasks.join_next() => self.reap(done),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.tasks.abort_all();
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(id) = done {
                // finished between the deadline and the abort
                self.in_flight.remove(&id);
            }
        }
        let waiting = self.isolation.take_waiting();
        let waiting = waiting.into_iter().map(|r| (r.id, r.claim_epoch));
        let in_flight = std::mem::take(&mut self.in_flight)
            .into_iter()
            .map(|(id, (epoch, _, _, _))| (id, epoch));
        let mut unreachable = false;
        for (id, epoch) in in_flight.chain(waiting) {
            if unreachable {
                tracing::warn!(run = %id, "not released (the database is unreachable); it stays owned: the same id replays it, or live executors adopt it after the takeover delay");
                continue;
            }
            let released = self
                .within(async {
                    let client = self.pool.get().await?;
                    runs::release_if_owned(&client, &id, epoch).await
                })
                .await;
            match released {
                Ok(()) => {
                    self.deps.metrics.released.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(run = %id, "released to the queue");
                }
                Err(e) => {
                    // a frozen or lost database must not hold the exit up run after run
                    unreachable = e.is_connectivity();
                    tracing::warn!(run = %id, error = %e, "cannot release; it stays owned: the same id replays it, or live executors adopt it after the takeover delay")
                }
            }
        }
        if let Err(e) = self.lock.mark_stopped().await {
            tracing::warn!(error = %e, "cannot mark the executor stopped");
        }
        tracing::info!("drained; executor stopped");
    }
}
