//! Process-wide latency histograms for `/metrics`: how long claims, steps and live-output acks
//! take. They are statics because the code that observes them (the claim loop, a workflow's
//! step, a NATS publisher) shares nothing else; every executor and publisher of the process adds
//! to the same ones, which is what a per-process metric means.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (Prometheus's `le`).
const BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A Prometheus histogram of durations with fixed buckets; lock-free.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len() + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let (name, help) = (self.name, self.help);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = BOUNDS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

pub static CLAIM: Histogram = Histogram::new(
    "spool_claim_duration_seconds",
    "Time of one claim statement (claiming up to a batch of runs)",
);
pub static STEP: Histogram = Histogram::new(
    "spool_step_duration_seconds",
    "Time a step took to execute (replayed steps are not counted)",
);
pub static PUBLISH_ACK: Histogram = Histogram::new(
    "spool_live_publish_ack_seconds",
    "Live-output lag: from publishing a chunk to JetStream's ack of it",
);
/// NATS operations of live output that failed (the output is republished once NATS answers).
pub static PUBLISH_ERRORS: AtomicU64 = AtomicU64::new(0);

/// The histograms and the publish-error counter as Prometheus text.
pub fn render(out: &mut String) {
    for h in [&CLAIM, &STEP, &PUBLISH_ACK] {
        h.render(out);
    }
    let _ = writeln!(
        out,
        "# HELP spool_live_publish_errors_total Live-output NATS operations that failed\n# TYPE spool_live_publish_errors_total counter\nspool_live_publish_errors_total {}",
        PUBLISH_ERRORS.load(Ordering::Relaxed)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_everything() {
        let h = Histogram::new("h_seconds", "test");
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("h_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("h_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("h_seconds_count 3\n"), "{out}");
        assert!(out.contains("h_seconds_sum 100.0033\n"), "{out}");
    }
}
