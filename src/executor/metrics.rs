//! Counters of one process, rendered as Prometheus text at `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::db::runs::Outcome;

#[derive(Debug, Default)]
pub struct Metrics {
    pub claimed: AtomicU64,
    pub recovered: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub dead: AtomicU64,
    pub lost: AtomicU64,
    pub released: AtomicU64,
    /// Runs of dead executors handed back to the queue by this process.
    pub adopted: AtomicU64,
    /// Times this executor stopped executing because it could not renew its lease.
    pub lease_lapses: AtomicU64,
    pub in_flight: AtomicU64,
    /// HTTP connections cut because the client stopped reading (slow attachers).
    pub connections_cut: AtomicU64,
    /// Readiness checks that reached the database (`/readyz` shares one per second).
    pub readiness_checks: AtomicU64,
    /// Connections closed to make room at the connection cap (they were serving no request).
    pub connections_evicted: AtomicU64,
    /// Connections refused at the cap (every connection was serving a request).
    pub connections_refused: AtomicU64,
    /// Finished runs deleted by retention from this process.
    pub purged: AtomicU64,
    /// The database's metrics (queues, executors), as Prometheus text, while this process holds
    /// the `metrics` maintenance lease (see `executor::maintenance`); `None` otherwise.
    pub db_snapshot: std::sync::Mutex<Option<String>>,
}

impl Metrics {
    pub fn finished(&self, outcome: Outcome) {
        let c = match outcome {
            Outcome::Succeeded => &self.succeeded,
            Outcome::Failed => &self.failed,
            Outcome::Cancelled => &self.cancelled,
            Outcome::Dead => &self.dead,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "spool_runs_claimed_total",
                "Runs claimed from the queue",
                &self.claimed,
            ),
            (
                "spool_runs_recovered_total",
                "Owned runs taken back after a restart",
                &self.recovered,
            ),
            (
                "spool_runs_succeeded_total",
                "Runs that ended succeeded here",
                &self.succeeded,
            ),
            (
                "spool_runs_failed_total",
                "Runs that ended failed here",
                &self.failed,
            ),
            (
                "spool_runs_cancelled_total",
                "Runs that ended cancelled here",
                &self.cancelled,
            ),
            (
                "spool_runs_dead_total",
                "Runs that ended dead here",
                &self.dead,
            ),
            (
                "spool_runs_purged_total",
                "Finished runs deleted by retention from this process",
                &self.purged,
            ),
            (
                "spool_runs_lost_total",
                "Runs taken over while executing here",
                &self.lost,
            ),
            (
                "spool_runs_released_total",
                "Runs handed back to the queue at shutdown",
                &self.released,
            ),
            (
                "spool_runs_adopted_total",
                "Runs of executors dead past their takeover delay handed back to the queue by this process",
                &self.adopted,
            ),
            (
                "spool_readiness_checks_total",
                "Readiness checks that reached the database",
                &self.readiness_checks,
            ),
            (
                "spool_http_connections_evicted_total",
                "Connections closed at the connection cap because they were serving no request",
                &self.connections_evicted,
            ),
            (
                "spool_http_connections_refused_total",
                "Connections refused at the connection cap",
                &self.connections_refused,
            ),
            (
                "spool_http_connections_cut_total",
                "Attach connections cut because the client stopped reading",
                &self.connections_cut,
            ),
            (
                "spool_lease_lapses_total",
                "Times this executor stopped executing because it could not renew its lease",
                &self.lease_lapses,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP spool_runs_in_flight Runs executing in this process\n# TYPE spool_runs_in_flight gauge\nspool_runs_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        crate::latency::render(&mut out);
        if let Some(db) = self.db_snapshot.lock().unwrap().as_ref() {
            out.push_str(db);
        }
        out
    }
}
