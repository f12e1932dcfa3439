//! Process-level tests: real `spool serve` processes (or the example server) against a real
//! PostgreSQL, stopped with real signals.

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

mod logs;
mod roles;

use common::process::{Binary, SpoolProcess};
use common::{steps_done, wait_steps, wait_terminal, wait_until, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_with_the_same_id_completes_each_finished_step_once() {
    let db = TestDb::new().await;
    let mut p = SpoolProcess::start(Binary::ExampleServer, &db, "p1", &[]).await;
    let res = reqwest::Client::new()
        .post(p.url("/v1/runs"))
        .json(&serde_json::json!({"workflow": "order", "id": "o1", "input": {"item": "book", "pause_ms": 400}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    wait_steps(&db, "o1", 1).await;
    p.signal(Signal::SIGKILL);
    p.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        db.status("o1").await,
        "running",
        "a killed executor keeps owning its runs"
    );
    let recorded_before = steps_done(&db, "o1").await;

    let _p = SpoolProcess::start(Binary::ExampleServer, &db, "p1", &[]).await;
    assert_eq!(
        wait_terminal(&db, "o1", Duration::from_secs(30)).await,
        "succeeded"
    );
    let rows = db
        .client()
        .await
        .query(
            "select o.name, o.claim_epoch, (select count(*) from example_ledger l where l.run_id = o.run_id and l.step = o.name)
               from spool.operation_outputs o where o.run_id = 'o1' order by o.step",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let mut memoized_before_kill = 0;
    for row in &rows {
        let (name, epoch, executions): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if epoch == 1 {
            memoized_before_kill += 1;
            assert_eq!(
                executions, 1,
                "step {name} finished before the kill and ran again"
            );
        } else {
            assert!(executions <= 2, "step {name} ran {executions} times");
        }
    }
    assert_eq!(memoized_before_kill, recorded_before);
    let attempt = db
        .scalar_i64("select attempt::int8 from spool.runs where id = 'o1'")
        .await;
    // the run recorded steps before the kill, so the crash is not charged to it (a run that
    // recorded nothing since its claim would be: see the poison-run tests)
    assert_eq!(attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_run_and_the_other_executor_finishes_it_from_its_last_step() {
    let db = TestDb::new().await;
    let mut a =
        SpoolProcess::start(Binary::Spool, &db, "a", &[("SPOOL_GRACE_PERIOD_MS", "100")]).await;
    db.exec("insert into spool.runs (id, workflow, input) values ('t', 'ticker', '{\"count\": 40, \"interval_ms\": 50, \"steps\": 8}')").await;
    wait_steps(&db, "t", 2).await;
    let b = SpoolProcess::start(Binary::Spool, &db, "b", &[]).await;
    a.signal(Signal::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        a.log_text()
    );
    assert!(
        a.log_text().contains("released to the queue"),
        "{}",
        a.log_text()
    );
    assert_eq!(
        wait_terminal(&db, "t", Duration::from_secs(30)).await,
        "succeeded"
    );
    let row = db
        .client()
        .await
        .query_one(
            "select executor_id, attempt from spool.runs where id = 't'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), b.executor_id);
    assert_eq!(
        row.get::<_, i32>(1),
        1,
        "a graceful release does not count as an attempt"
    );
    let first_epoch_steps = db
        .scalar_i64(
            "select count(*) from spool.operation_outputs where run_id = 't' and claim_epoch = 1",
        )
        .await;
    assert!(
        first_epoch_steps >= 2,
        "steps finished before the release were kept"
    );
    assert_eq!(steps_done(&db, "t").await, 8);
    let stopped: bool = db
        .client()
        .await
        .query_one(
            "select stopped_at is not null from spool.executors where id = 'a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_executor_id_refuses_to_start() {
    let db = TestDb::new().await;
    let first = SpoolProcess::start(Binary::Spool, &db, "dup", &[]).await;
    let mut second = SpoolProcess::spawn(Binary::Spool, &db, "dup", &[]);
    let status = second.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success());
    assert!(
        second.log_text().contains("held by another live process"),
        "{}",
        second.log_text()
    );
    // the first one is unaffected and still works
    db.exec("insert into spool.runs (id, workflow) values ('n', 'noop')")
        .await;
    assert_eq!(
        wait_terminal(&db, "n", Duration::from_secs(10)).await,
        "succeeded"
    );
    let owner: String = db
        .client()
        .await
        .query_one("select executor_id from spool.runs where id = 'n'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, first.executor_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_aborts_the_process_every_time_ends_dead_and_other_runs_complete() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.runs (id, workflow, max_attempts) values ('poison', 'abort', 3);
         insert into spool.runs (id, workflow, input)
              select 'ok-' || i, 'ticker', '{\"count\": 2, \"interval_ms\": 1}' from generate_series(1, 3) i;",
    )
    .await;
    let mut restarts = 0;
    let _survivor = loop {
        let mut p = SpoolProcess::spawn(Binary::ExampleServer, &db, "crashy", &[]);
        // Either the poison run kills the process again, or it is finally dead.
        let outcome = wait_until(
            "the executor to crash or the poison run to end",
            Duration::from_secs(30),
            || {
                let exited = p.try_exited();
                let db = &db;
                async move {
                    if exited {
                        return Some(false);
                    }
                    (db.status("poison").await == "dead").then_some(true)
                }
            },
        )
        .await;
        if outcome {
            break p; // keep it running: it still has the other runs to finish
        }
        restarts += 1;
        assert!(
            restarts <= 5,
            "the poison run was not given up after its attempt limit"
        );
    };
    assert_eq!(restarts, 3, "one crash per allowed attempt");
    let error: Value = db
        .client()
        .await
        .query_one("select error from spool.runs where id = 'poison'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(error["code"], "attempts_exhausted");
    for i in 1..=3 {
        assert_eq!(
            wait_terminal(&db, &format!("ok-{i}"), Duration::from_secs(30)).await,
            "succeeded"
        );
    }
}

/// Invariants 8 and 9: a poison run that aborts the process at start uses up its own attempts,
/// not those of the long runs it shared the executor with. With the default max_attempts, the
/// poison run ends dead and every ticker succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_run_uses_up_only_its_own_attempts_and_innocent_runs_succeed() {
    let db = TestDb::new().await;
    // one statement: the executor claims all five together, so the first crash hits them all
    db.exec(
        "insert into spool.runs (id, workflow, input)
         select 'ticker-' || i, 'ticker', '{\"count\": 30, \"interval_ms\": 40, \"steps\": 30}'::jsonb
           from generate_series(1, 4) i
         union all
         select 'poison', 'abort', '{}'::jsonb",
    )
    .await;
    let mut crashes = 0;
    let survivor = loop {
        let mut p = SpoolProcess::spawn(Binary::ExampleServer, &db, "crashy", &[]);
        let poison_ended = wait_until(
            "the executor to crash or the poison run to end",
            Duration::from_secs(60),
            || {
                let exited = p.try_exited();
                let db = &db;
                async move {
                    if exited {
                        return Some(false);
                    }
                    (db.status("poison").await == "dead").then_some(true)
                }
            },
        )
        .await;
        if poison_ended {
            break p;
        }
        crashes += 1;
        assert!(crashes <= 12, "the executor crash-looped {crashes} times");
    };
    for i in 1..=4 {
        let id = format!("ticker-{i}");
        assert_eq!(
            wait_terminal(&db, &id, Duration::from_secs(60)).await,
            "succeeded",
            "{id} was dragged down by the poison run"
        );
    }
    let error: Value = db
        .client()
        .await
        .query_one("select error from spool.runs where id = 'poison'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(error["code"], "attempts_exhausted");
    drop(survivor);
}
