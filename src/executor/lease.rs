//! The executor's side of its lease: when it must renew, and when it must stop executing.
//!
//! The database considers the executor alive until `heartbeat_at + lease`, where `heartbeat_at`
//! is the database's `now()` while the last renewal ran. The executor counts from the moment it
//! *sent* that renewal, on a monotonic clock, and stops executing (aborts its run tasks, claims
//! nothing, publishes nothing) at nine tenths of the lease after it. The renewal ran after it was
//! sent, so the executor stops before the database deems it dead — let alone before its runs are
//! adopted (`takeover_after` later still) or its session is ended by a successor with the same id.
//! The tenth is margin for the two clocks' rates, which differ by far less.

use std::time::Duration;

use tokio::time::Instant;

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
