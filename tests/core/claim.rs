use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool::db::runs::{self, Claimant};
use spool::Registry;

use crate::common::{settings, wait_until, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_claim_a_run_twice_nor_exceed_their_batch() {
    let db = TestDb::new().await;
    db.exec("insert into spool.runs (workflow) select 'noop' from generate_series(1, 10000)")
        .await;
    db.exec("insert into spool.executors (id, workflows) select 'c' || i, '{noop}' from generate_series(0, 7) i")
        .await;
    const BATCH: i64 = 50;
    let seen = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let pool = db.pool.clone();
        let seen = seen.clone();
        tasks.spawn(async move {
            let me = format!("c{i}");
            let workflows = vec!["noop".to_string()];
            loop {
                let client = pool.get().await.unwrap();
                let who = Claimant {
                    executor_id: &me,
                    incarnation: 1,
                    workflows: &workflows,
                    queues: None,
                };
                let claimed = runs::claim(&client, &who, BATCH).await.unwrap();
                assert!(
                    claimed.len() as i64 <= BATCH,
                    "claimed {} > batch {BATCH}",
                    claimed.len()
                );
                if claimed.is_empty() {
                    return;
                }
                let mut seen = seen.lock().unwrap();
                for r in claimed {
                    assert_eq!(r.status, "running");
                    assert_eq!(r.executor_id.as_deref(), Some(me.as_str()));
                    assert_eq!(r.attempt, 1);
                    assert_eq!(r.claim_epoch, 1);
                    seen.push((r.id, me.clone()));
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<&String> = seen.iter().map(|(id, _)| id).collect();
    assert_eq!(seen.len(), 10_000, "every run claimed exactly once");
    assert_eq!(unique.len(), 10_000, "no run claimed twice");
    let claimers: HashSet<&String> = seen.iter().map(|(_, who)| who).collect();
    assert!(claimers.len() > 1, "the claimers really competed");
    // the database agrees on the owner of each run
    let client = db.client().await;
    for row in client
        .query(
            "select id, executor_id from spool.runs where status = 'running'",
            &[],
        )
        .await
        .unwrap()
    {
        let id: String = row.get(0);
        let owner: String = row.get(1);
        assert!(seen.contains(&(id, owner)));
    }
}

#[tokio::test]
async fn claim_honours_run_at_priority_and_queue() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('c', '{noop}');
         insert into spool.runs (id, workflow, priority) values ('low', 'noop', 5), ('high', 'noop', -5);
         insert into spool.runs (id, workflow, run_at) values ('later', 'noop', now() + interval '1 hour');
         insert into spool.runs (id, workflow, queue) values ('other', 'noop', 'other');
         insert into spool.runs (id, workflow) values ('unknown', 'not-registered');",
    )
    .await;
    let client = db.client().await;
    let workflows = vec!["noop".to_string()];
    let queues = vec!["default".to_string()];
    let who = Claimant {
        executor_id: "c",
        incarnation: 1,
        workflows: &workflows,
        queues: Some(&queues),
    };
    let first = runs::claim(&client, &who, 1).await.unwrap();
    assert_eq!(
        first.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["high"]
    );
    let rest = runs::claim(&client, &who, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["low"]
    );
    // an older incarnation claims nothing
    db.exec("update spool.executors set incarnation = 2 where id = 'c'; update spool.runs set run_at = now() where id = 'later'").await;
    assert!(runs::claim(&client, &who, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_executors_share_a_backlog_of_long_runs_instead_of_one_taking_it() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.runs (workflow, input)
         select 'ticker', '{\"count\": 3, \"interval_ms\": 150}' from generate_series(1, 64)",
    )
    .await;
    let mut executors = Vec::new();
    for id in ["adaptive-1", "adaptive-2"] {
        let mut s = settings(id);
        s.adaptive = true;
        s.concurrency = 512;
        s.claim_batch = 512;
        executors.push(db.executor_with(s, Registry::with_builtins()).await);
    }
    // while the backlog drains, no executor ever holds more than the adaptive floor of these
    // long runs
    let most = Arc::new(std::sync::atomic::AtomicI64::new(0));
    wait_until("the long runs to finish", Duration::from_secs(60), || {
        let (db, most) = (&db, most.clone());
        async move {
            let held = db
                .scalar_i64(
                    "select coalesce(max(n), 0) from (select count(*) as n from spool.runs
                      where status = 'running' group by executor_id) r",
                )
                .await;
            most.fetch_max(held, std::sync::atomic::Ordering::Relaxed);
            let left = db
                .scalar_i64("select count(*) from spool.runs where status <> 'succeeded'")
                .await;
            (left == 0).then_some(())
        }
    })
    .await;
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!(most <= 16, "an executor held {most} long runs at once");
    assert_eq!(
        db.scalar_i64("select count(distinct executor_id) from spool.runs")
            .await,
        2,
        "both executors ran some"
    );
    for e in executors {
        e.shutdown().await.unwrap();
    }
}
