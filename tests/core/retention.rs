//! Retention: finished runs (and their steps) older than their queue's retention are deleted in
//! batches by the one executor holding the maintenance lease; nothing unfinished, recent or in a
//! queue that keeps longer is touched; `CALL spool.purge_finished(...)` does it at psql.

use std::time::Duration;

use spool::Registry;

use crate::common::{settings, wait_until, TestDb};

/// `n` runs of `queue` that finished `age` ago, each with one memoized step.
async fn finished(db: &TestDb, prefix: &str, queue: &str, n: i64, age: &str) {
    db.exec(&format!(
        "insert into spool.runs (id, workflow, queue, status, finished_at, created_at, output)
              select '{prefix}-' || i, 'noop', '{queue}', 'succeeded', now() - interval '{age}',
                     now() - interval '{age}' - interval '1 minute', '{{}}'
                from generate_series(1, {n}) i;
         insert into spool.operation_outputs (run_id, step, name, output, claim_epoch, started_at)
              select '{prefix}-' || i, 1, 'only', '1', 1, now() - interval '{age}'
                from generate_series(1, {n}) i;"
    ))
    .await;
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.scalar_i64(sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_finished_runs_and_their_steps_are_deleted_by_one_executor_and_nothing_else_is() {
    let db = TestDb::new().await;
    finished(&db, "old", "default", 1_200, "2 hours").await; // more than two batches
    finished(&db, "recent", "default", 10, "10 minutes").await;
    finished(&db, "kept", "audit", 10, "2 hours").await;
    db.exec("insert into spool.queue_retention (queue, retention) values ('audit', '30 days')")
        .await;
    // unfinished runs, however old, are never touched
    db.exec(
        "insert into spool.runs (id, workflow, queue, run_at, created_at)
              values ('waiting', 'nobody.runs.this', 'default', now(), now() - interval '3 days'),
                     ('later', 'noop', 'default', now() + interval '1 day', now() - interval '3 days')",
    )
    .await;

    let mut executors = Vec::new();
    for id in ["keeper-1", "keeper-2"] {
        let mut s = settings(id);
        s.retention = Some(Duration::from_secs(3600));
        s.maintenance_interval = Duration::from_millis(50);
        executors.push(db.executor_with(s, Registry::with_builtins()).await);
    }
    wait_until(
        "the old runs to be deleted",
        Duration::from_secs(30),
        || async {
            (count(&db, "select count(*) from spool.runs where id like 'old-%'").await == 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(
            &db,
            "select count(*) from spool.runs where id like 'recent-%'"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from spool.runs where id like 'kept-%'"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from spool.runs where id in ('waiting', 'later')"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from spool.operation_outputs where run_id like 'old-%'"
        )
        .await,
        0,
        "their steps went with them"
    );
    assert_eq!(
        count(&db, "select count(*) from spool.operation_outputs").await,
        20
    );
    // one lease row names the executor doing it (renewed every round; on a loaded machine a
    // round can come late, so this waits for a moment it is current)
    wait_until("one executor holding the retention lease", Duration::from_secs(30), || async {
        (count(
            &db,
            "select count(*) from spool.maintenance_leases
              where name = 'retention' and expires_at > now() and holder in ('keeper-1', 'keeper-2')",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;
    for e in executors {
        e.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_finished_at_psql_deletes_in_committed_batches_and_says_how_many() {
    let db = TestDb::new().await;
    finished(&db, "old", "default", 2_500, "40 days").await;
    finished(&db, "young", "default", 5, "1 day").await;
    let purged: i64 = db
        .client()
        .await
        .query_one("call spool.purge_finished('30 days', 1000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(purged, 2_500);
    assert_eq!(count(&db, "select count(*) from spool.runs").await, 5);
    // inside a transaction block it refuses (it commits per batch)
    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    let err = tx
        .query_one("call spool.purge_finished('30 days')", &[])
        .await
        .unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("transaction termination"), "{err:?}");
}
