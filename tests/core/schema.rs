use std::time::Duration;

use serde_json::{json, Value};
use spool::Registry;

use crate::common::{wait_terminal, wait_until, TestDb};

/// Runs `sql`, which must be refused with SQLSTATE `code`, and returns the name of the
/// constraint that refused it.
async fn refused_with(db: &TestDb, code: &str, sql: &str) -> String {
    let err = db
        .client()
        .await
        .batch_execute(sql)
        .await
        .expect_err("should be refused");
    let db_err = err.as_db_error().expect("a database error");
    assert_eq!(db_err.code().code(), code, "{db_err:?}");
    db_err.constraint().unwrap().to_string()
}

/// Runs `sql` and returns the name of the check constraint that refused it.
async fn refused_by(db: &TestDb, sql: &str) -> String {
    refused_with(db, "23514", sql).await
}

#[tokio::test]
async fn a_plain_insert_is_all_it_takes_and_defaults_fill_the_rest() {
    let db = TestDb::new().await;
    let row = db
        .client()
        .await
        .query_one(
            "insert into spool.runs (workflow, input) values ('ticker', '{\"count\": 5}')
             returning id, status, queue, priority, attempt, max_attempts, concurrency_key, run_at <= now()",
            &[],
        )
        .await
        .unwrap();
    let id: String = row.get(0);
    assert_eq!(id.len(), 36, "a UUID by default: {id}");
    assert_eq!(row.get::<_, String>(1), "queued");
    assert_eq!(row.get::<_, String>(2), "default");
    assert_eq!(row.get::<_, i32>(3), 0);
    assert_eq!(row.get::<_, i32>(4), 0);
    assert_eq!(row.get::<_, i32>(5), 5);
    assert_eq!(row.get::<_, Option<String>>(6), None);
    assert!(row.get::<_, bool>(7));
}

#[tokio::test]
async fn nonsense_inserted_by_sql_is_refused_by_named_constraints() {
    let db = TestDb::new().await;
    assert_eq!(
        refused_by(
            &db,
            "insert into spool.runs (id, workflow) values ('has space', 'noop')"
        )
        .await,
        "runs_id_format"
    );
    assert_eq!(
        refused_by(
            &db,
            "insert into spool.runs (id, workflow) values ('', 'noop')"
        )
        .await,
        "runs_id_format"
    );
    assert_eq!(
        refused_by(
            &db,
            &format!(
                "insert into spool.runs (id, workflow) values ('{}', 'noop')",
                "x".repeat(129)
            )
        )
        .await,
        "runs_id_format"
    );
    assert_eq!(
        refused_by(
            &db,
            "insert into spool.runs (workflow, status) values ('noop', 'bogus')"
        )
        .await,
        "runs_status_known"
    );
    assert_eq!(
        refused_by(
            &db,
            "insert into spool.runs (workflow, status) values ('noop', 'running')"
        )
        .await,
        "runs_running_has_owner"
    );
    assert_eq!(
        refused_by(&db, "insert into spool.runs (workflow) values ('')").await,
        "runs_workflow_format"
    );
    assert_eq!(
        refused_by(
            &db,
            &format!(
                "insert into spool.runs (workflow) values ('{}')",
                "w".repeat(129)
            )
        )
        .await,
        "runs_workflow_format"
    );
    assert_eq!(
        refused_by(
            &db,
            "insert into spool.runs (workflow, queue) values ('noop', E'a\\nb')"
        )
        .await,
        "runs_queue_format"
    );
    // the longest id, workflow and queue are fine
    db.exec(&format!(
        "insert into spool.runs (id, workflow, queue) values ('{}', '{}', '{}')",
        "x".repeat(128),
        "w".repeat(128),
        "q".repeat(128)
    ))
    .await;
    assert_eq!(
        refused_by(
            &db,
            "insert into spool.runs (workflow, max_attempts) values ('noop', 0)"
        )
        .await,
        "runs_max_attempts_positive"
    );
    assert_eq!(
        refused_by(
            &db,
            &format!(
                "insert into spool.runs (workflow, concurrency_key) values ('noop', '{}')",
                "k".repeat(10_000)
            )
        )
        .await,
        "runs_concurrency_key_length"
    );
    assert_eq!(
        db.scalar_i64("select count(*) from spool.runs").await,
        1,
        "only the longest-names row went in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_inserted_run_of_an_unknown_workflow_never_loops_and_shows_as_unrunnable() {
    let db = TestDb::new().await;
    let executor = db.executor("e", Registry::with_builtins()).await;
    db.exec("insert into spool.runs (id, workflow) values ('mystery', 'no-such-workflow')")
        .await;
    db.exec("insert into spool.runs (id, workflow, input) values ('fine', 'noop', '{\"x\": 1}')")
        .await;
    assert_eq!(
        wait_terminal(&db, "fine", Duration::from_secs(10)).await,
        "succeeded"
    );
    // a wrong-shaped input for a known workflow fails clearly
    db.exec("insert into spool.runs (id, workflow, input) values ('bad-input', 'ticker', '{\"count\": \"five\"}')").await;
    assert_eq!(
        wait_terminal(&db, "bad-input", Duration::from_secs(10)).await,
        "failed"
    );
    let error: Value = db
        .client()
        .await
        .query_one("select error from spool.runs where id = 'bad-input'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(error["code"], "invalid_input");

    let row = db
        .client()
        .await
        .query_one(
            "select status, attempt, executor_id from spool.runs where id = 'mystery'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "queued");
    assert_eq!(row.get::<_, i32>(1), 0, "never claimed, so never looping");
    assert_eq!(row.get::<_, Option<String>>(2), None);
    let reason: String = db
        .client()
        .await
        .query_one(
            "select reason from spool.unrunnable_runs where id = 'mystery'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("no-such-workflow"), "{reason}");
    executor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_by_sql_ends_a_queued_run_at_once_and_a_running_one_at_its_next_step() {
    let db = TestDb::new().await;
    db.exec("insert into spool.runs (id, workflow, run_at) values ('later', 'ticker', now() + interval '1 hour')").await;
    let status: String = db
        .client()
        .await
        .query_one("select spool.cancel_run('later')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "cancelled");
    assert_eq!(db.status("later").await, "cancelled");

    let executor = db.executor("e", Registry::with_builtins()).await;
    db.exec("insert into spool.runs (id, workflow, input) values ('long', 'ticker', '{\"count\": 100, \"interval_ms\": 20, \"steps\": 50}')").await;
    wait_until(
        "the ticker to record a step",
        Duration::from_secs(10),
        || async {
            (db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'long'")
                .await
                > 0)
            .then_some(())
        },
    )
    .await;
    db.exec("select spool.cancel_run('long')").await;
    assert_eq!(
        wait_terminal(&db, "long", Duration::from_secs(10)).await,
        "cancelled"
    );
    assert!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'long'")
            .await
            < 50
    );
    executor.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_show_progress_depth_and_liveness() {
    let db = TestDb::new().await;
    let executor = db.executor("view-e", Registry::with_builtins()).await;
    db.exec("insert into spool.runs (id, workflow, input) values ('v', 'ticker', '{\"count\": 3, \"interval_ms\": 1, \"steps\": 3}')").await;
    db.exec("insert into spool.runs (id, workflow, concurrency_key, run_at) values ('w', 'noop', 'k', now() + interval '1 hour')").await;
    assert_eq!(
        wait_terminal(&db, "v", Duration::from_secs(10)).await,
        "succeeded"
    );
    let client = db.client().await;
    let p = client
        .query_one(
            "select steps_done, last_step, status from spool.run_progress where id = 'v'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(p.get::<_, i64>(0), 3);
    assert_eq!(p.get::<_, String>(1), "ticks-3-3");
    let d = client
        .query_one(
            "select scheduled from spool.queue_depth where concurrency_key = 'k'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(d.get::<_, i64>(0), 1);
    let alive: bool = client
        .query_one(
            "select alive from spool.executor_liveness where id = 'view-e'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(alive);
    executor.shutdown().await.unwrap();
    let alive: bool = client
        .query_one(
            "select alive from spool.executor_liveness where id = 'view-e'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!alive, "a stopped executor is not alive");
    let _ = json!(null);
}

/// Runs `sql` and returns the name of the foreign key (SQLSTATE 23503) that refused it.
async fn refused_as_foreign_key(db: &TestDb, sql: &str) -> String {
    refused_with(db, "23503", sql).await
}

/// A step refers to its run as a foreign key would have it (V11 checks it per statement): no
/// step without its run, no run renamed from under its steps, and a deleted or truncated run
/// takes its steps with it.
#[tokio::test]
async fn a_step_needs_its_run_and_goes_with_it() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.runs (id, workflow, status, finished_at, output)
              select 'r' || i, 'noop', 'succeeded', now(), '{}' from generate_series(1, 4) i;
         insert into spool.operation_outputs (run_id, step, name, output, claim_epoch, started_at)
              values ('r1', 1, 'a', '1', 1, now()), ('r1', 2, 'b', '2', 1, now()),
                     ('r2', 1, 'a', '1', 1, now()), ('r3', 1, 'a', '1', 1, now());",
    )
    .await;
    let steps = |sql: &'static str| {
        let db = &db;
        async move { db.scalar_i64(sql).await }
    };
    // a step of no run, alone or among steps of real runs: refused, nothing goes in
    assert_eq!(
        refused_as_foreign_key(
            &db,
            "insert into spool.operation_outputs (run_id, step, name, output, claim_epoch, started_at)
                  values ('ghost', 1, 'a', '1', 1, now())"
        )
        .await,
        "operation_outputs_run_fkey"
    );
    assert_eq!(
        refused_as_foreign_key(
            &db,
            "insert into spool.operation_outputs (run_id, step, name, output, claim_epoch, started_at)
                  values ('r4', 1, 'a', '1', 1, now()), ('ghost', 1, 'a', '1', 1, now())"
        )
        .await,
        "operation_outputs_run_fkey"
    );
    assert_eq!(
        steps("select count(*) from spool.operation_outputs").await,
        4
    );
    // a step moved to no run
    assert_eq!(
        refused_as_foreign_key(
            &db,
            "update spool.operation_outputs set run_id = 'ghost' where run_id = 'r3'"
        )
        .await,
        "operation_outputs_run_fkey"
    );
    // a run renamed from under its steps; one without steps may be renamed
    assert_eq!(
        refused_as_foreign_key(&db, "update spool.runs set id = 'renamed' where id = 'r1'").await,
        "operation_outputs_run_fkey"
    );
    db.exec("update spool.runs set id = 'r4-renamed' where id = 'r4'")
        .await;
    // deleting runs deletes their steps, and only theirs
    db.exec("delete from spool.runs where id in ('r1', 'r3')")
        .await;
    assert_eq!(
        steps("select count(*) from spool.operation_outputs where run_id in ('r1', 'r3')").await,
        0
    );
    assert_eq!(
        steps("select count(*) from spool.operation_outputs where run_id = 'r2'").await,
        1
    );
    db.exec("truncate spool.runs").await;
    assert_eq!(
        steps("select count(*) from spool.operation_outputs").await,
        0
    );
}
