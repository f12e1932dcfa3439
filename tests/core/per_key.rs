use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde::Deserialize;
use spool::{Registry, RunContext, StepError, WorkflowError};

use crate::common::{settings, wait_until, TestDb};

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
