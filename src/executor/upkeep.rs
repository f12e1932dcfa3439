//! The control loop's periodic upkeep, each a bounded statement on the claim pool or the lock
//! connection: taking back owned runs nobody executes (recovery), the key sweep, adopting the runs
//! of executors dead past their takeover delay, and moving the isolation of crash suspects along.
//!
//! Architecture invariant: these run only from the control loop, one after another, never
//! concurrently with a claim, so the set of runs in flight is known while they run.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::ControlLoop;
use crate::db::runs;

impl ControlLoop {
    /// Takes back owned runs that no task here is executing.
    pub(super) async fn recover(&mut self) {
        let in_flight: Vec<String> = self.in_flight.keys().cloned().collect();
        let recovered = self
            .within(async {
                let client = self.claims.get().await?;
                runs::reclaim_owned(
                    &client,
                    &self.settings.executor_id,
                    self.lock.incarnation,
                    &in_flight,
                )
                .await
            })
            .await;
        match recovered {
            Ok(runs) => {
                for r in &runs {
                    tracing::info!(run = %r.run.id, attempt = r.run.attempt, blamed = r.blamed, "recovered an owned run; replaying it");
                }
                self.deps
                    .metrics
                    .recovered
                    .fetch_add(runs.len() as u64, Ordering::Relaxed);
                for run in self.isolation.admit(runs) {
                    self.spawn(run);
                }
            }
            Err(e) => tracing::warn!(error = %e, "recovery failed; will retry"),
        }
    }

    /// Hands the runs of executors dead past their takeover delay back to the queue (a new claim
    /// epoch), so this and every other live executor claim them.
    pub(super) async fn adopt_orphans(&mut self) {
        if self.settings.takeover_after.is_zero() {
            return;
        }
        let limit = self.settings.claim_batch.max(self.settings.concurrency) as i32;
        let adopted = self
            .within(async {
                let client = self.claims.get().await?;
                runs::adopt_orphaned_runs(&client, limit).await
            })
            .await;
        match adopted {
            Ok(ids) if ids.is_empty() => {}
            Ok(ids) => {
                tracing::warn!(runs = ids.len(), first = %ids[0], "adopted the runs of an executor that has not been alive past its takeover delay");
                self.deps
                    .metrics
                    .adopted
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "adoption failed; will retry"),
        }
    }

    /// Moves isolation along: when the group on probation has passed, the next group is
    /// recorded and started; once none is left, the record is cleared and the runs held back
    /// start. A group is recorded before it starts and cleared before anything else starts, so
    /// a crash always blames exactly the runs that were executing.
    pub(super) async fn advance_isolation(&mut self) {
        if !self.isolation.active() {
            return;
        }
        let in_flight = &self.in_flight;
        if self.isolation.group_passed(|id| in_flight.contains_key(id)) {
            self.isolation.end_group();
        }
        if self.isolation.group().is_some() {
            return;
        }
        let ids = self.isolation.next_group().unwrap_or_default();
        if let Err(e) = self.lock.set_probation(&ids).await {
            tracing::warn!(error = %e, "cannot record the runs on probation; retrying");
            return;
        }
        if ids.is_empty() {
            for run in self.isolation.release_held() {
                self.spawn(run);
            }
            tracing::info!("isolation over; claiming again");
            return;
        }
        for run in self
            .isolation
            .start_group(Instant::now() + self.settings.probation)
        {
            tracing::info!(run = %run.id, attempt = run.attempt, "starting a suspect alone");
            self.spawn(run);
        }
    }

    /// Makes ready the waiting runs of keys that nobody made ready (see
    /// `spool.promote_waiting_keys`).
    pub(super) async fn sweep_keys(&mut self) {
        let promoted = self
            .within(async {
                let client = self.claims.get().await?;
                runs::promote_waiting_keys(&client).await
            })
            .await;
        match promoted {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "key sweep made waiting runs ready"),
            Err(e) => tracing::warn!(error = %e, "key sweep failed; will retry"),
        }
    }
}
