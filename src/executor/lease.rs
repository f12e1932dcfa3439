//! The executor's side of its lease: when it must renew, and when it must stop executing.
//!
//! The database considers the executor alive until `heartbeat_at + lease`, where `heartbeat_at`
//! is the database's `now()` while the last renewal ran. The executor counts from the moment it
//! *sent* that renewal, on a monotonic clock, and stops executing (aborts its run tasks, claims
//! nothing, publishes nothing) at nine tenths of the lease after it. The renewal ran after it was
//! sent, so the executor stops before the database deems it dead — let alone before its runs are
//! adopted (`takeover_after` later still) or its session is ended by a successor with the same id.
//! The tenth is margin for the two clocks' rates, which differ by far less.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{sleep_until_some, ExecutorError, IdentityError};

/// The lease as this process sees it.
#[derive(Debug)]
pub struct Lease {
    lease: Duration,
    /// When the last successful renewal was sent; the lease holds until nine tenths after it.
    renewed_at: Instant,
    /// The next renewal is due.
    next_renewal: Instant,
    /// Execution stopped because the lease could not be renewed in time.
    fenced: bool,
}

impl Lease {
    /// A lease just taken (registering the incarnation renewed it).
    pub fn new(lease: Duration, taken_at: Instant) -> Self {
        Self {
            lease,
            renewed_at: taken_at,
            next_renewal: taken_at + lease / 4,
            fenced: false,
        }
    }

    /// How long one statement on the lock connection may take: a quarter of the lease, so a
    /// frozen connection is noticed with renewals still to spare.
    pub fn statement_deadline(lease: Duration) -> Duration {
        (lease / 4).max(Duration::from_millis(50))
    }

    pub fn renewal_due(&self, now: Instant) -> bool {
        now >= self.next_renewal
    }

    pub fn next_renewal(&self) -> Instant {
        self.next_renewal
    }

    /// The moment execution must stop unless a renewal succeeds first.
    pub fn valid_until(&self) -> Instant {
        self.renewed_at + self.lease.mul_f64(0.9)
    }

    /// A renewal sent at `sent_at` succeeded.
    pub fn renewed(&mut self, sent_at: Instant) {
        self.renewed_at = self.renewed_at.max(sent_at);
        self.next_renewal = Instant::now() + self.lease / 4;
        self.fenced = false;
    }

    /// A renewal failed: try again soon.
    pub fn renewal_failed(&mut self) {
        self.next_renewal = Instant::now() + (self.lease / 20).max(Duration::from_millis(50));
    }

    /// True once the lease may have lapsed: nothing may execute.
    pub fn lapsed(&self, now: Instant) -> bool {
        now >= self.valid_until()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    pub fn fence(&mut self) {
        self.fenced = true;
    }
}

/// The control loop's side of the lease: renewing it, stopping execution when it lapses, and
/// taking the id back after the lock connection was lost or froze.
impl super::ControlLoop {
    /// Renews the lease on the lock connection, within a deadline. A connection that does not
    /// answer in time is treated as lost: this process ends its own stale lock session and takes
    /// the id again. Returns false when the executor must stop (shutdown while reconnecting).
    pub(super) async fn renew(&mut self, stop: &CancellationToken) -> Result<bool, ExecutorError> {
        let sent = Instant::now();
        match self.lock.heartbeat().await {
            Ok(true) => {
                if self.lease.is_fenced() {
                    tracing::info!("lease renewed; executing again");
                }
                self.lease.renewed(sent);
                Ok(true)
            }
            Ok(false) => {
                self.tasks.abort_all();
                Err(IdentityError::Superseded(self.settings.executor_id.clone()).into())
            }
            Err(IdentityError::Timeout(d)) => {
                tracing::warn!(deadline = ?d, "the executor lock connection stopped answering; reconnecting");
                self.lease.renewal_failed();
                self.reacquire(stop).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the lease; retrying");
                self.lease.renewal_failed();
                Ok(true)
            }
        }
    }

    /// The lease could not be renewed in time: stop executing before anyone may take the runs
    /// over. Run tasks are aborted (they publish nothing more); the runs stay owned by this
    /// incarnation and are taken back by recovery once the lease is renewed, unless live
    /// executors adopted them meanwhile.
    pub(super) fn self_fence(&mut self) {
        tracing::error!(
            lease = ?self.settings.lease,
            in_flight = self.in_flight.len(),
            "the lease could not be renewed in time: stopped executing"
        );
        self.lease.fence();
        self.tasks.abort_all();
        self.in_flight.clear();
        let _ = self.isolation.take_waiting();
        self.deps.metrics.in_flight.store(0, Ordering::Relaxed);
        self.deps
            .metrics
            .lease_lapses
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The lock connection closed. Retries until the id is held again (`Ok(true)`), shutdown
    /// (`Ok(false)`), or another process turns out to hold it (error: this process must stop).
    pub(super) async fn reacquire(
        &mut self,
        stop: &CancellationToken,
    ) -> Result<bool, ExecutorError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.lease.lapsed(Instant::now()) && !self.lease.is_fenced() {
                self.self_fence();
            }
            let sent = Instant::now();
            let attempt = self.lock.reacquire(
                &self.target,
                &self.workflows,
                self.settings.queues.as_deref(),
            );
            // the lease may lapse while the attempt waits on a dead link: stop executing then
            let lapses_at = (!self.lease.is_fenced()).then(|| self.lease.valid_until());
            let result = tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                r = attempt => Some(r),
                _ = sleep_until_some(lapses_at) => None,
            };
            let Some(result) = result else {
                continue; // the loop's first line fences
            };
            match result {
                Ok(()) => {
                    tracing::info!("executor lock reacquired");
                    // registering again renewed the lease
                    self.lease.renewed(sent);
                    return Ok(true);
                }
                Err(IdentityError::Db(e)) => {
                    tracing::warn!(error = %e, "cannot reacquire the executor lock yet");
                }
                Err(IdentityError::Timeout(d)) => {
                    tracing::warn!(deadline = ?d, "cannot reacquire the executor lock yet: no answer");
                }
                Err(fatal) => {
                    self.tasks.abort_all();
                    return Err(fatal.into());
                }
            }
            let retry_at = (Instant::now() + backoff).min(if self.lease.is_fenced() {
                Instant::now() + backoff
            } else {
                self.lease.valid_until()
            });
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep_until(retry_at) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_lease_lapses_nine_tenths_after_the_last_renewal_was_sent() {
        let lease = Duration::from_secs(10);
        let start = Instant::now();
        let mut l = Lease::new(lease, start);
        assert!(!l.lapsed(start + Duration::from_millis(8_999)));
        assert!(l.lapsed(start + Duration::from_secs(9)));
        // a renewal sent at +5 s that took 3 s to answer counts from +5 s
        tokio::time::advance(Duration::from_secs(8)).await;
        l.renewed(start + Duration::from_secs(5));
        assert!(!l.lapsed(start + Duration::from_millis(13_999)));
        assert!(l.lapsed(start + Duration::from_secs(14)));
        assert!(l.renewal_due(Instant::now() + lease / 4));
    }
}
