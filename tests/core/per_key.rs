use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Deserialize;
use spool::{Registry, RunContext, StepError, WorkflowError};

use crate::common::{settings, wait_terminal, wait_until, TestDb};

#[derive(Deserialize)]
struct Keyed {
    key: String,
    n: i32,
}

async fn log(pool: &Pool, k: &Keyed, event: &str) {
    pool.get()
        .await
        .unwrap()
        .execute(
            "insert into key_log (key, n, event, at) values ($1, $2, $3, clock_timestamp())",
            &[&k.key, &k.n, &event],
        )
        .await
        .unwrap();
}

/// One step that logs its start and end (database clock) around a short pause.
fn keyed_registry(pool: Pool) -> Registry {
    let pool = Arc::new(pool);
    let mut r = Registry::new();
    r.register("keyed", move |ctx: RunContext, input: Keyed| {
        let pool = pool.clone();
        async move {
            ctx.step("work", |_| {
                let (pool, input) = (pool.clone(), &input);
                async move {
                    log(&pool, input, "start").await;
                    // the step's work: long enough for a second claimer to try the same key
                    pool.get()
                        .await
                        .unwrap()
                        .execute("select pg_sleep(0.002)", &[])
                        .await
                        .unwrap();
                    log(&pool, input, "end").await;
                    Ok::<_, StepError>(())
                }
            })
            .await?;
            Ok::<_, WorkflowError>(input.n)
        }
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_with_one_key_never_overlap_and_start_in_enqueue_order() {
    let db = TestDb::new().await;
    db.exec("create table key_log (key text, n int, event text, at timestamptz)")
        .await;
    let mut executors = Vec::new();
    for i in 0..4 {
        let mut s = settings(&format!("k{i}"));
        s.concurrency = 8;
        s.claim_batch = 8;
        executors.push(db.executor_with(s, keyed_registry(db.pool.clone())).await);
    }
    // 20 keys x 25 runs, interleaved across keys, in one statement: enqueue order is n.
    db.exec(
        "insert into spool.runs (workflow, concurrency_key, input)
         select 'keyed', 'key-' || k, jsonb_build_object('n', n, 'key', 'key-' || k)
           from generate_series(0, 24) n, generate_series(0, 19) k
          order by n, k",
    )
    .await;
    wait_until(
        "all 500 keyed runs to succeed",
        Duration::from_secs(120),
        || async {
            (db.scalar_i64("select count(*) from spool.runs where status = 'succeeded'")
                .await
                == 500)
                .then_some(())
        },
    )
    .await;

    let rows = db
        .client()
        .await
        .query("select key, n, event from key_log order by key, at", &[])
        .await
        .unwrap();
    let mut by_key: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    for row in rows {
        by_key
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2)));
    }
    assert_eq!(by_key.len(), 20);
    for (key, events) in &by_key {
        let expected: Vec<(i32, String)> = (0..25)
            .flat_map(|n| [(n, "start".to_string()), (n, "end".to_string())])
            .collect();
        assert_eq!(
            events, &expected,
            "key {key}: runs overlapped or started out of enqueue order"
        );
    }
    let used: HashSet<String> = db
        .client()
        .await
        .query("select distinct executor_id from spool.runs", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(used.len() > 1, "several executors took part");
    for e in executors {
        e.shutdown().await.unwrap();
    }
}

/// A workflow whose one step waits until the test opens its gate (a row in `gate`), so a test
/// decides when each run ends.
fn gated_registry(pool: Pool) -> Registry {
    let pool = Arc::new(pool);
    let mut r = Registry::with_builtins();
    r.register(
        "gated",
        move |ctx: RunContext, _input: serde_json::Value| {
            let pool = pool.clone();
            async move {
                let id = ctx.run_id().to_string();
                ctx.step("wait for the gate", |_| {
                    let (pool, id) = (pool.clone(), id.clone());
                    async move {
                        loop {
                            let open = pool
                                .get()
                                .await
                                .unwrap()
                                .query_opt("select 1 from gate where run_id = $1", &[&id])
                                .await
                                .unwrap()
                                .is_some();
                            if open {
                                return Ok::<_, StepError>(());
                            }
                            let poll = Duration::from_millis(10);
                            tokio::time::sleep(poll).await;
                        }
                    }
                })
                .await?;
                Ok::<_, WorkflowError>(id)
            }
        },
    );
    r
}

/// Invariant 5 with inserts that commit out of order: the run inserted first (enqueue_seq 1)
/// commits only after a later run of its key has started. It must wait for that run to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_insert_commits_late_never_runs_beside_a_later_run_of_its_key() {
    let db = TestDb::new().await;
    db.exec("create table gate (run_id text primary key)").await;
    let executor = db.executor("e1", gated_registry(db.pool.clone())).await;

    // T1 inserts `first` and stays open; `second`, of the same key, commits and starts.
    let t1 = spool::db::connect_dedicated(&db.target, "late-inserter", None)
        .await
        .unwrap();
    t1.client
        .batch_execute(
            "begin;
             insert into spool.runs (id, workflow, concurrency_key) values ('first', 'gated', 'K');",
        )
        .await
        .unwrap();
    db.exec(
        "insert into spool.runs (id, workflow, concurrency_key) values ('second', 'gated', 'K')",
    )
    .await;
    wait_until("second to start", Duration::from_secs(10), || async {
        (db.status("second").await == "running").then_some(())
    })
    .await;
    t1.client.batch_execute("commit").await.unwrap();

    // Claims after the commit: a probe run claimed later than `first` became visible.
    for probe in ["probe-1", "probe-2"] {
        db.exec(&format!(
            "insert into spool.runs (id, workflow) values ('{probe}', 'noop')"
        ))
        .await;
        assert_eq!(
            wait_terminal(&db, probe, Duration::from_secs(10)).await,
            "succeeded"
        );
    }
    assert_eq!(
        db.status("first").await,
        "queued",
        "the late-committed run started while a run of its key was running"
    );
    assert_eq!(
        db.scalar_i64(
            "select count(*) from spool.runs where concurrency_key = 'K' and status = 'running'"
        )
        .await,
        1
    );

    // It starts once the running run of its key ends.
    db.exec("insert into gate values ('second')").await;
    assert_eq!(
        wait_terminal(&db, "second", Duration::from_secs(10)).await,
        "succeeded"
    );
    wait_until("first to start", Duration::from_secs(10), || async {
        (db.status("first").await == "running").then_some(())
    })
    .await;
    db.exec("insert into gate values ('first')").await;
    assert_eq!(
        wait_terminal(&db, "first", Duration::from_secs(10)).await,
        "succeeded"
    );
    executor.shutdown().await.unwrap();
}

/// The database itself refuses a second running run of one (queue, key), whoever writes it.
#[tokio::test]
async fn the_database_refuses_a_second_running_run_of_a_key() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.runs (id, workflow, concurrency_key) values ('a', 'noop', 'K'), ('b', 'noop', 'K');
         update spool.runs set status = 'running', executor_id = 'x' where id = 'a';",
    )
    .await;
    let err = db
        .client()
        .await
        .batch_execute("update spool.runs set status = 'running', executor_id = 'y' where id = 'b'")
        .await
        .expect_err("a second running run of key K was accepted");
    assert_eq!(
        err.as_db_error().and_then(|e| e.constraint()),
        Some("runs_one_running_per_key")
    );
    // Other queues and keys are independent.
    db.exec(
        "insert into spool.runs (id, workflow, queue, concurrency_key, status, executor_id)
              values ('c', 'noop', 'other', 'K', 'running', 'x'),
                     ('d', 'noop', 'default', 'L', 'running', 'x')",
    )
    .await;
}

/// A waiting keyed run whose key has no ready or running run (its insert raced the end of the
/// key's last run, or rows were edited by hand) is found by the executors' key sweep and runs.
#[tokio::test]
async fn a_waiting_run_with_no_head_left_is_made_ready_by_the_key_sweep() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.runs (id, workflow, concurrency_key) values ('w1', 'noop', 'K'), ('w2', 'noop', 'K');
         update spool.runs set key_ready = false where concurrency_key = 'K';",
    )
    .await;
    let executor = db.executor("e1", Registry::with_builtins()).await;
    assert_eq!(
        wait_terminal(&db, "w1", Duration::from_secs(10)).await,
        "succeeded"
    );
    assert_eq!(
        wait_terminal(&db, "w2", Duration::from_secs(10)).await,
        "succeeded"
    );
    let order = db
        .scalar_i64(
            "select count(*) from spool.runs a, spool.runs b
              where a.id = 'w1' and b.id = 'w2' and a.finished_at <= b.started_at",
        )
        .await;
    assert_eq!(order, 1, "w2 started before w1 ended");
    executor.shutdown().await.unwrap();
}
