//! `SPOOL_LOG_FORMAT=json`: one JSON object per line, naming the executor, the run and its claim
//! epoch wherever they apply.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_terminal, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_executor_run_and_epoch() {
    let db = TestDb::new().await;
    let env = [
        ("SPOOL_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,spool::executor=debug"),
    ];
    let mut p = SpoolProcess::start(Binary::Spool, &db, "json-logs", &env).await;
    db.exec("insert into spool.runs (id, workflow, input) values ('logged', 'ticker', '{\"count\": 2, \"interval_ms\": 1}')")
        .await;
    assert_eq!(
        wait_terminal(&db, "logged", Duration::from_secs(30)).await,
        "succeeded"
    );
    p.signal(Signal::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(30)).await.success());

    let text = p.log_text();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 3, "{text}");
    for l in &lines {
        assert!(
            l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(),
            "{l}"
        );
    }
    let finished = lines
        .iter()
        .find(|l| l["message"] == "run finished")
        .unwrap_or_else(|| panic!("a 'run finished' line: {text}"));
    let spans = finished["spans"].as_array().expect("spans");
    let executor = spans
        .iter()
        .find(|s| s["name"] == "executor")
        .expect("executor span");
    assert_eq!(executor["executor_id"], "json-logs");
    let run = spans.iter().find(|s| s["name"] == "run").expect("run span");
    assert_eq!(run["run_id"], "logged");
    assert_eq!(run["epoch"], 1);
    assert_eq!(run["workflow"], "ticker");
    assert_eq!(finished["status"], "succeeded");

    // an unknown format is refused before anything starts
    let mut bad = SpoolProcess::spawn(
        Binary::Spool,
        &db,
        "bad-format",
        &[("SPOOL_LOG_FORMAT", "yaml")],
    );
    assert_eq!(bad.wait_exit(Duration::from_secs(20)).await.code(), Some(2));
    assert!(
        bad.log_text().contains("SPOOL_LOG_FORMAT=\"yaml\""),
        "{}",
        bad.log_text()
    );
}
