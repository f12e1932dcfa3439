//! `/metrics`: the process's counters and latency histograms, and the database's metrics served
//! by the one executor holding the `metrics` lease (another takes over when it dies); every
//! exposition passes `promtool check metrics` (Debian's prometheus package), and the example
//! alert rules pass `promtool check rules`.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::nats::NatsServer;
use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_terminal, wait_until, TestDb};
use crate::{env_refs, live_env, ticker};

fn promtool() -> String {
    std::env::var("SPOOL_TEST_PROMTOOL").unwrap_or_else(|_| "promtool".into())
}

async fn scrape(p: &SpoolProcess) -> String {
    reqwest::get(p.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn promtool_accepts(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `just test` installs it)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_one_executor_at_a_time_serves_the_databases() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let mut env = live_env(&db, &nats);
    env.push(("SPOOL_MAINTENANCE_INTERVAL_MS".into(), "100".into()));
    let mut a = SpoolProcess::start(Binary::Spool, &db, "metrics-a", &env_refs(&env)).await;
    let mut b = SpoolProcess::start(Binary::Spool, &db, "metrics-b", &env_refs(&env)).await;
    ticker(&db, "ticks", 3, 1, 2).await;
    db.exec(
        "insert into spool.runs (id, workflow) values ('orphan', 'nobody.runs.this');
         insert into spool.runs (id, workflow, run_at) values ('later', 'noop', now() + interval '1 hour')",
    )
    .await;
    assert_eq!(
        wait_terminal(&db, "ticks", Duration::from_secs(30)).await,
        "succeeded"
    );

    // the database's metrics, from exactly one of the two
    let holder = wait_until(
        "the database's metrics",
        Duration::from_secs(30),
        || async {
            let (ta, tb) = (scrape(&a).await, scrape(&b).await);
            let stamp = "spool_db_metrics_collected_timestamp_seconds";
            if sample(&ta, stamp).is_some() && sample(&tb, stamp).is_some() {
                panic!("both processes serve the database's metrics");
            }
            // a reading taken after the ticker ended: the orphan ready and unrunnable, none
            // running, the later run scheduled (the families come from separate queries, so a
            // reading from just before the inserts can show the ticker as the one ready run)
            let settled = |t: &str| {
                sample(t, "spool_queue_ready_runs{queue=\"default\"}") == Some(1.0)
                    && sample(t, "spool_queue_scheduled_runs{queue=\"default\"}") == Some(1.0)
                    && sample(t, "spool_queue_running_runs{queue=\"default\"}") == Some(0.0)
                    && sample(t, "spool_queue_unrunnable_runs{queue=\"default\"}") == Some(1.0)
            };
            match (settled(&ta), settled(&tb)) {
                (true, _) => Some(("a", ta, tb)),
                (_, true) => Some(("b", tb, ta)),
                _ => None,
            }
        },
    )
    .await;
    let (who, db_text, other) = holder;
    for (series, want) in [
        ("spool_queue_ready_runs{queue=\"default\"}", 1.0),
        ("spool_queue_scheduled_runs{queue=\"default\"}", 1.0),
        ("spool_queue_running_runs{queue=\"default\"}", 0.0),
        ("spool_queue_unrunnable_runs{queue=\"default\"}", 1.0),
        ("spool_executors_alive", 2.0),
        ("spool_executor_up{executor=\"metrics-a\"}", 1.0),
    ] {
        assert_eq!(
            sample(&db_text, series),
            Some(want),
            "{series} from {who}:\n{db_text}"
        );
    }
    assert!(
        sample(
            &db_text,
            "spool_queue_oldest_ready_age_seconds{queue=\"default\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(sample(
        &db_text,
        "spool_executor_heartbeat_age_seconds{executor=\"metrics-b\"}"
    )
    .is_some());
    assert!(sample(&other, "spool_db_metrics_collected_timestamp_seconds").is_none());

    // the process's own: claims and steps timed, live output acknowledged, both pass promtool
    let both = [db_text.clone(), other.clone()];
    let total = |series: &str| both.iter().filter_map(|t| sample(t, series)).sum::<f64>();
    assert!(total("spool_claim_duration_seconds_count") >= 2.0);
    assert_eq!(
        total("spool_step_duration_seconds_count"),
        2.0,
        "the ticker's two steps"
    );
    assert!(
        total("spool_live_publish_ack_seconds_count") >= 4.0,
        "three ticks and the end"
    );
    assert_eq!(total("spool_runs_succeeded_total"), 1.0);
    assert_eq!(total("spool_live_publish_errors_total"), 0.0);
    for text in &both {
        promtool_accepts(text);
    }

    // the holder dies: the other takes the lease over and reports it down
    let (dead, survivor) = if who == "a" {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let dead_id = dead.executor_id.clone();
    dead.signal(Signal::SIGKILL);
    dead.wait_exit(Duration::from_secs(10)).await;
    let series = format!("spool_executor_up{{executor=\"{dead_id}\"}}");
    wait_until(
        "the survivor serving the database's metrics",
        Duration::from_secs(60),
        || async {
            let t = scrape(survivor).await;
            (sample(&t, &series) == Some(0.0)).then_some(())
        },
    )
    .await;
    promtool_accepts(&scrape(survivor).await);
}

#[test]
fn the_example_alert_rules_pass_promtool() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yaml");
    let out = Command::new(promtool())
        .args(["check", "rules", rules])
        .output()
        .expect("promtool");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("SUCCESS: 13 rules found"), "{report}");
}
