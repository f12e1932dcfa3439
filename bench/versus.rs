//! The side-by-side table: each target of Spool against the fastest peer (Graphile Worker,
//! batched), from the rows of one run, with the peer's figure, the ratio and whether the target
//! is met. A figure a run did not measure (a section left out with `BENCH_ONLY`) reads "—".

use crate::report::{format_value, Row, Target, Unit};

/// What a line of the table asks of Spool.
#[derive(Clone, Copy)]
enum Goal {
    /// Spool ÷ the peer at least this.
    PeerRatio(f64),
    AtMost(f64),
    AtLeast(f64),
    /// No target: a figure that puts the targets in context (plain SQL making a run's two
    /// transitions, section 1c).
    Context,
}

struct Line {
    figure: &'static str,
    /// The Spool row: the first whose figure starts with this.
    spool: &'static str,
    /// The peer's row: the first from Graphile Worker whose figure contains this.
    peer: Option<&'static str>,
    unit: Unit,
    goal: Goal,
}

const LINES: &[Line] = &[
    Line {
        figure: "no-op drain, tuned (1 executor)",
        spool: "no-op drain, 1 executor,",
        peer: Some("no-op drain"),
        unit: Unit::PerSec("runs"),
        goal: Goal::PeerRatio(2.0),
    },
    Line {
        figure: "plain SQL making the same two transitions, 2 clients (1c)",
        spool: "1c SQL claim, then finish: two committed",
        peer: Some("no-op drain"),
        unit: Unit::PerSec("rows"),
        goal: Goal::Context,
    },
    Line {
        figure: "no-op drain at Spool's defaults (1 executor)",
        spool: "no-op drain, 1 executor at Spool's defaults",
        peer: Some("no-op drain"),
        unit: Unit::PerSec("runs"),
        goal: Goal::PeerRatio(1.0),
    },
    Line {
        figure: "WAL bytes per no-op run, insert to finish",
        spool: "no-op drain, 1 executor: WAL bytes per run",
        peer: Some("WAL bytes per job"),
        unit: Unit::Plain("B"),
        goal: Goal::AtMost(600.0),
    },
    Line {
        figure: "WAL bytes per row of plain SQL making them (1c)",
        spool: "1c SQL claim, then finish: WAL bytes",
        peer: Some("WAL bytes per job"),
        unit: Unit::Plain("B"),
        goal: Goal::Context,
    },
    Line {
        figure: "commits per no-op run",
        spool: "no-op drain, 1 executor: commits per run",
        peer: Some("commits per job"),
        unit: Unit::Plain(""),
        goal: Goal::AtMost(0.01),
    },
    Line {
        figure: "enqueue → start p50",
        spool: "enqueue → start p50",
        peer: Some("enqueue → start p50"),
        unit: Unit::Ms,
        goal: Goal::AtMost(1.0),
    },
    Line {
        figure: "enqueue → start p99",
        spool: "enqueue → start p99",
        peer: Some("enqueue → start p99"),
        unit: Unit::Ms,
        goal: Goal::AtMost(5.0),
    },
    Line {
        figure: "memoized steps, 1 executor",
        spool: "memoized steps",
        peer: None,
        unit: Unit::PerSec("steps"),
        goal: Goal::AtLeast(50_000.0),
    },
];

fn value(row: Option<&Row>) -> Option<f64> {
    row.and_then(|r| r.value.as_ref().ok().copied())
}

/// The table, in markdown. `extra` rows (each with its own target, such as the claim beside
/// backlogs) are appended with their status.
pub fn table(rows: &[Row], extra: &[&str]) -> String {
    let mut out = String::from(
        "| figure | Spool | Graphile Worker batched | Spool ÷ Graphile | target | met? |\n\
         |---|---:|---:|---:|---|---|\n",
    );
    let show = |v: Option<f64>, unit: Unit| v.map_or("—".to_string(), |v| format_value(v, unit));
    for line in LINES {
        let spool = value(rows.iter().find(|r| r.figure.starts_with(line.spool)));
        let peer = line.peer.and_then(|p| {
            value(
                rows.iter()
                    .find(|r| r.figure.starts_with("Graphile Worker") && r.figure.contains(p)),
            )
        });
        let ratio = match (spool, peer) {
            (Some(s), Some(p)) if p > 0.0 => Some(s / p),
            _ => None,
        };
        let (target, met) = match line.goal {
            Goal::PeerRatio(t) => (format!("≥ {t}× Graphile"), ratio.map(|r| r >= t)),
            Goal::AtMost(t) => (
                format!("≤ {}", format_value(t, line.unit)),
                spool.map(|s| s <= t),
            ),
            Goal::AtLeast(t) => (
                format!("≥ {}", format_value(t, line.unit)),
                spool.map(|s| s >= t),
            ),
            Goal::Context => ("(context)".to_string(), None),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            line.figure,
            show(spool, line.unit),
            show(peer, line.unit),
            ratio.map_or("—".into(), |r| format!("{r:.2}×")),
            target,
            match line.goal {
                Goal::Context => "—",
                _ => status(met),
            },
        ));
    }
    for prefix in extra {
        for r in rows.iter().filter(|r| r.figure.starts_with(prefix)) {
            out.push_str(&format!(
                "| {} | {} | — | — | {} | {} |\n",
                r.figure,
                r.value
                    .as_ref()
                    .map_or_else(|e| format!("FAILED: {e}"), |v| format_value(*v, r.unit)),
                peer_free_target(r),
                r.met().map_or("—", |m| status(Some(m))),
            ));
        }
    }
    out
}

/// A loaded-claim row's target names what it is a fraction of, with the fraction measured.
fn peer_free_target(r: &Row) -> String {
    match (&r.target, &r.ceiling, &r.value) {
        (Some(Target::RatioAtLeast(t)), Some((label, c)), Ok(v)) if *c > 0.0 => {
            format!("≥ {t}× {label}: {:.2}×", v / c)
        }
        _ => r.target_text(),
    }
}

fn status(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}
