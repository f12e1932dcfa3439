//! Invariant 6 with leases: liveness expires with the heartbeat, a stale lock session is ended
//! by the same id, an executor that cannot renew stops executing before its runs are adopted, and
//! the runs of an executor that stays dead are adopted by live ones.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;
use spool::executor::{self, ExecutorSettings, IdentityError, Metrics};
use spool::{Registry, RunContext, StepError, WorkflowError};

use crate::common::{settings, wait_terminal, wait_until, TestDb};

/// A dedicated session that holds executor `id`'s lock, as a process on a dead host would.
async fn hold_lock(db: &TestDb, id: &str) -> spool::db::DedicatedConnection {
    let conn = spool::db::connect_dedicated(&db.target, &format!("spool-lock:{id}"), None)
        .await
        .unwrap();
    assert!(spool::db::executors::try_lock_executor_id(&conn.client, id)
        .await
        .unwrap());
    conn
}

async fn start(
    db: &TestDb,
    s: ExecutorSettings,
    registry: Registry,
) -> Result<executor::RunningExecutor, executor::ExecutorError> {
    executor::start(
        s,
        db.target.clone(),
        spool::db::pool(&db.target, 8, "spool-test-executor"),
        registry,
        executor::discard_chunks(),
        Arc::new(Metrics::default()),
    )
    .await
}

/// A workflow whose step records each execution in `side_effects` and then waits until the
/// test opens the gate of its phase (`gate`), so a test decides when it ends.
fn gated(pool: Pool) -> Registry {
    let pool = Arc::new(pool);
    let mut r = Registry::with_builtins();
    r.register("gated", move |ctx: RunContext, _input: Value| {
        let pool = pool.clone();
        async move {
            let id = ctx.run_id().to_string();
            ctx.step("wait", |info| {
                let (pool, id) = (pool.clone(), id.clone());
                async move {
                    let client = pool.get().await.unwrap();
                    client
                        .execute(
                            "insert into side_effects (run_id, phase, claim_epoch) values ($1, 'started', $2)",
                            &[&id, &info.claim_epoch],
                        )
                        .await
                        .unwrap();
                    loop {
                        if client
                            .query_opt("select 1 from gate where run_id = $1", &[&id])
                            .await
                            .unwrap()
                            .is_some()
                        {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await; // gate poll interval
                    }
                    client
                        .execute(
                            "insert into side_effects (run_id, phase, claim_epoch) values ($1, 'passed', $2)",
                            &[&id, &info.claim_epoch],
                        )
                        .await
                        .unwrap();
                    Ok::<_, StepError>(())
                }
            })
            .await?;
            Ok::<_, WorkflowError>(Value::Null)
        }
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_ends_a_stale_session_holding_its_lock_and_starts_at_once() {
    let db = TestDb::new().await;
    // A process on a dead host: its session still holds the lock, its lease expired long ago.
    let stale = hold_lock(&db, "e").await;
    db.exec(
        "insert into spool.executors (id, workflows, lease_ms, heartbeat_at)
              values ('e', '{noop}', 2000, now() - interval '1 hour')",
    )
    .await;
    let executor = start(&db, settings("e"), Registry::with_builtins())
        .await
        .expect("the restarted id starts instead of refusing");
    wait_until(
        "the stale session to be ended",
        Duration::from_secs(10),
        || {
            let closed = stale.client.is_closed();
            async move { closed.then_some(()) }
        },
    )
    .await;
    db.exec("insert into spool.runs (id, workflow) values ('r', 'noop')")
        .await;
    assert_eq!(
        wait_terminal(&db, "r", Duration::from_secs(10)).await,
        "succeeded"
    );
    executor.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_live_holder_of_the_id_still_makes_a_second_process_refuse() {
    let db = TestDb::new().await;
    let live = hold_lock(&db, "e").await;
    db.exec("insert into spool.executors (id, workflows, lease_ms) values ('e', '{noop}', 1000)")
        .await;
    // a live holder renews its lease every quarter
    let pool = db.pool.clone();
    let renewer = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            every.tick().await;
            let client = pool.get().await.unwrap();
            client
                .execute(
                    "update spool.executors set heartbeat_at = now() where id = 'e'",
                    &[],
                )
                .await
                .unwrap();
        }
    });
    let mut s = settings("e");
    s.lock_wait = Duration::ZERO;
    match start(&db, s, Registry::with_builtins()).await {
        Err(executor::ExecutorError::Identity(IdentityError::InUse(_))) => {}
        Err(e) => panic!("expected InUse, got {e}"),
        Ok(_) => panic!("a second process with a live id started"),
    }
    assert!(!live.client.is_closed(), "the live holder was ended");
    renewer.abort();
}

/// An executor whose lease cannot be renewed (its heartbeat statement blocks, as on a frozen
/// connection) stops executing on its own; once its lease has expired and the takeover delay has
/// passed, a live executor adopts the run. The stopped executor's step never passes its gate, so
/// the work after the gate happens exactly once, on the adopter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_executor_that_cannot_renew_stops_executing_before_its_run_is_adopted() {
    let db = TestDb::new().await;
    db.exec(
        "create table gate (run_id text primary key);
         create table side_effects (run_id text, phase text, claim_epoch int8);",
    )
    .await;
    let mut a = settings("a");
    a.lease = Duration::from_millis(1000);
    a.takeover_after = Duration::from_millis(200);
    let executor_a = start(&db, a, gated(db.pool.clone())).await.unwrap();
    db.exec("insert into spool.runs (id, workflow) values ('r', 'gated')")
        .await;
    wait_until("a to start the step", Duration::from_secs(10), || async {
        (db.scalar_i64("select count(*) from side_effects where phase = 'started'")
            .await
            == 1)
            .then_some(())
    })
    .await;

    // Freeze a's lease: its heartbeat update waits on this row lock.
    let blocker = spool::db::connect_dedicated(&db.target, "blocker", None)
        .await
        .unwrap();
    blocker
        .client
        .batch_execute("begin; select 1 from spool.executors where id = 'a' for update;")
        .await
        .unwrap();
    // (whether a's lock is held at a given moment varies: a lapsed executor ends its own stale
    // session and tries to take its id again, which the frozen row keeps failing)
    wait_until("a's lease to expire", Duration::from_secs(10), || async {
        (db.scalar_i64("select count(*) from spool.executor_liveness where id = 'a' and not alive")
            .await
            == 1)
            .then_some(())
    })
    .await;

    // b adopts the run (a is dead past its takeover delay) and starts the step again.
    let mut b = settings("b");
    b.takeover_after = Duration::from_millis(200);
    let executor_b = start(&db, b, gated(db.pool.clone())).await.unwrap();
    wait_until(
        "b to adopt and start the run",
        Duration::from_secs(10),
        || async {
            (db.scalar_i64(
                "select count(*) from side_effects where phase = 'started' and claim_epoch > 1",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    let owner: String = db
        .client()
        .await
        .query_one("select executor_id from spool.runs where id = 'r'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "b");

    // Open the gate: only the adopter's step may pass it.
    db.exec("insert into gate values ('r')").await;
    assert_eq!(
        wait_terminal(&db, "r", Duration::from_secs(10)).await,
        "succeeded"
    );
    blocker.client.batch_execute("commit").await.unwrap();
    let passed = db
        .scalar_i64("select count(*) from side_effects where phase = 'passed'")
        .await;
    let passed_by_a = db
        .scalar_i64("select count(*) from side_effects where phase = 'passed' and claim_epoch = 1")
        .await;
    assert_eq!(
        (passed, passed_by_a),
        (1, 0),
        "the executor that lost its lease kept executing"
    );
    // a renews again and serves new runs
    db.exec("insert into spool.runs (id, workflow) select 'after-' || i, 'noop' from generate_series(1, 4) i")
        .await;
    for i in 1..=4 {
        assert_eq!(
            wait_terminal(&db, &format!("after-{i}"), Duration::from_secs(10)).await,
            "succeeded"
        );
    }
    executor_a.shutdown().await.unwrap();
    executor_b.shutdown().await.unwrap();
}

/// Runs of an executor that never comes back are adopted, spread over the live executors, each
/// with a new claim epoch; an executor that disabled takeover keeps its runs for its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_of_an_executor_that_never_returns_are_adopted_unless_it_disabled_takeover() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows, lease_ms, takeover_after_ms, heartbeat_at)
              values ('gone', '{noop}', 1000, 1000, now() - interval '1 minute'),
                     ('statefulset-0', '{noop}', 1000, 0, now() - interval '1 minute');
         insert into spool.runs (id, workflow, status, executor_id, incarnation, claim_epoch, attempt, started_at)
              select 'orphan-' || i, 'noop', 'running', 'gone', 1, 1, 1, now() from generate_series(1, 40) i;
         insert into spool.runs (id, workflow, status, executor_id, incarnation, claim_epoch, attempt, started_at)
              values ('kept', 'noop', 'running', 'statefulset-0', 1, 1, 1, now());",
    )
    .await;
    let mut executors = Vec::new();
    for id in ["live-1", "live-2"] {
        let mut s = settings(id);
        s.takeover_after = Duration::from_millis(1000);
        s.concurrency = 4;
        s.claim_batch = 4;
        executors.push(start(&db, s, Registry::with_builtins()).await.unwrap());
    }
    wait_until("every orphan to succeed", Duration::from_secs(30), || async {
        (db.scalar_i64("select count(*) from spool.runs where id like 'orphan-%' and status = 'succeeded' and claim_epoch = 3")
            .await
            == 40)
            .then_some(())
    })
    .await;
    assert_eq!(
        db.scalar_i64(
            "select count(distinct executor_id) from spool.runs where id like 'orphan-%'"
        )
        .await,
        2,
        "adopted runs were spread over the live executors"
    );
    assert_eq!(
        db.scalar_i64("select attempt::int8 from spool.runs where id = 'orphan-1'")
            .await,
        2,
        "an adopted run that recorded no step is charged the attempt"
    );
    assert_eq!(db.status("kept").await, "running");
    let reason: String = db
        .client()
        .await
        .query_one(
            "select reason from spool.unrunnable_runs where id = 'kept'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("takeover disabled"), "{reason}");
    let orphan_reason = db
        .scalar_i64("select count(*) from spool.unrunnable_runs where id like 'orphan-%'")
        .await;
    assert_eq!(orphan_reason, 0);
    for e in executors {
        e.shutdown().await.unwrap();
    }
}
