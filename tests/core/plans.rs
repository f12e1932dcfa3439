//! The batched writes' plans stay linear in the batch whatever the statistics say.
//!
//! Statistics taken while a backlog was queued and nothing ran (every claimer column null, no
//! run running) made the planner estimate the matching runs at one row; it then walked every
//! running run once per write, and a drain's speed depended on when autovacuum had last analyzed
//! the table. These tests recreate those statistics, put 2,048 runs in flight, and count the
//! rows every plan node of a 512-write batch touches (EXPLAIN ANALYZE, inside a transaction that
//! is rolled back), with the planner's custom and generic plans alike.

use serde_json::Value;
use tokio_postgres::types::ToSql;

use spool::db::runs::{self, Claimant, FINISH_MANY_SQL};
use spool::db::steps::RECORD_STEPS_SQL;

use crate::common::TestDb;

const IN_FLIGHT: i64 = 2048;
const BATCH: usize = 512;
/// Rows a linear plan may touch per write: a few probes and the write itself.
const PER_WRITE: f64 = 20.0;

/// A database whose statistics were taken with 3,000 queued runs and none running, then 2,048
/// of them claimed by executor `e`. Returns the claimed runs' ids and epochs.
async fn in_flight_after_stale_statistics(db: &TestDb) -> (Vec<String>, Vec<i64>) {
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (workflow) select 'noop' from generate_series(1, 3000);
         analyze spool.runs;",
    )
    .await;
    let client = db.client().await;
    let workflows = vec!["noop".to_string()];
    let who = Claimant {
        executor_id: "e",
        incarnation: 1,
        workflows: &workflows,
        queues: None,
    };
    let mut claimed = Vec::new();
    while (claimed.len() as i64) < IN_FLIGHT {
        let got = runs::claim(&client, &who, 512).await.unwrap();
        assert!(!got.is_empty(), "claimed only {}", claimed.len());
        claimed.extend(got);
    }
    claimed
        .into_iter()
        .take(BATCH)
        .map(|r| (r.id, r.claim_epoch))
        .unzip()
}

/// Rows touched by every node of a plan: what it returned and what its filters removed, times
/// its loops.
fn rows_touched(node: &Value) -> f64 {
    let n = |k: &str| node.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let loops = n("Actual Loops").max(1.0);
    let own =
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Join Filter")) * loops;
    let children: f64 = node
        .get("Plans")
        .and_then(Value::as_array)
        .map(|plans| plans.iter().map(rows_touched).sum())
        .unwrap_or(0.0);
    own + children
}

/// EXPLAIN ANALYZE of `sql` with `params` of SQL `types`, under `mode` (custom or generic
/// plans), rolled back. Returns the rows the plan touched and the rows the write affected.
async fn explain(
    db: &TestDb,
    mode: &str,
    sql: &str,
    types: &[&str],
    params: &[&(dyn ToSql + Sync)],
) -> (f64, f64) {
    let mut client = db.client().await;
    // EXPLAIN takes no bind parameters: the values go in as literals of a prepared statement
    let mut args = Vec::new();
    for (ty, value) in types.iter().zip(params) {
        let row = client
            .query_one(&format!("select quote_literal($1::{ty}::text)"), &[*value])
            .await
            .unwrap();
        args.push(format!("{}::{ty}", row.get::<_, String>(0)));
    }
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "set local plan_cache_mode = {mode}; prepare batch_write ({}) as {sql}",
        types.join(", ")
    ))
    .await
    .unwrap();
    let plan: Value = tx
        .query_one(
            &format!(
                "explain (analyze, format json) execute batch_write({})",
                args.join(", ")
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    client
        .batch_execute("deallocate batch_write")
        .await
        .unwrap();
    let root = &plan[0]["Plan"];
    (
        rows_touched(root),
        root["Actual Rows"].as_f64().unwrap_or(0.0),
    )
}

#[tokio::test]
async fn a_batch_of_finishes_beside_thousands_of_running_runs_touches_rows_linearly() {
    let db = TestDb::new().await;
    let (ids, epochs) = in_flight_after_stale_statistics(&db).await;
    let statuses = vec!["succeeded"; ids.len()];
    let nulls: Vec<Option<Value>> = vec![None; ids.len()];
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let (touched, written) = explain(
            &db,
            mode,
            FINISH_MANY_SQL,
            &["text[]", "int8[]", "text[]", "jsonb[]", "jsonb[]"],
            &[&ids, &epochs, &statuses, &nulls, &nulls],
        )
        .await;
        assert_eq!(written, BATCH as f64, "{mode}: every finish is written");
        assert!(
            touched <= PER_WRITE * BATCH as f64,
            "{mode}: a batch of {BATCH} finishes touched {touched} rows"
        );
    }
}

#[tokio::test]
async fn a_batch_of_steps_beside_thousands_of_running_runs_touches_rows_linearly() {
    let db = TestDb::new().await;
    let (ids, epochs) = in_flight_after_stale_statistics(&db).await;
    let steps = vec![1_i32; ids.len()];
    let names = vec!["s"; ids.len()];
    let outputs: Vec<Option<Value>> = vec![Some(serde_json::json!(1)); ids.len()];
    let errors: Vec<Option<Value>> = vec![None; ids.len()];
    let started = vec![chrono::Utc::now(); ids.len()];
    let from: Vec<i32> = (0..ids.len() as i32).map(|i| i + 1).collect();
    let chunks: Vec<String> = (0..ids.len()).map(|i| format!("chunk {i}")).collect();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let (touched, recorded) = explain(
            &db,
            mode,
            RECORD_STEPS_SQL,
            &[
                "text[]",
                "int8[]",
                "int4[]",
                "text[]",
                "jsonb[]",
                "jsonb[]",
                "timestamptz[]",
                "int4[]",
                "int4[]",
                "text[]",
            ],
            &[
                &ids, &epochs, &steps, &names, &outputs, &errors, &started, &from, &from, &chunks,
            ],
        )
        .await;
        assert_eq!(recorded, BATCH as f64, "{mode}: every step is answered");
        assert!(
            touched <= PER_WRITE * BATCH as f64,
            "{mode}: a batch of {BATCH} steps touched {touched} rows"
        );
    }
}

/// An idle executor's claims are planned while the queue is empty, and PostgreSQL keeps the
/// generic plan it then settles on until the next ANALYZE. A backlog inserted since must still
/// be claimed by reading only the runs claimed: the plan made for an empty table scanned the
/// whole table on every claim, comparing each row with every claimed tuple id (a fresh
/// install's first drain ran at a seventh of its speed until autovacuum analyzed the table).
/// The claim runs as an executor's does, a prepared statement on one connection; the rows it
/// read come from the transaction's own table statistics.
#[tokio::test]
async fn a_claim_planned_on_an_empty_queue_reads_only_what_it_claims_once_a_backlog_arrives() {
    let db = TestDb::new().await;
    db.exec("insert into spool.executors (id, workflows) values ('e', '{noop}')")
        .await;
    let mut client = db.client().await;
    let stmt = client.prepare(&runs::claim_sql()).await.unwrap();
    let workflows = vec!["noop".to_string()];
    let queues: Option<Vec<String>> = None;
    let limit = BATCH as i64;
    // an idle executor's polls: custom plans first, then the plan cache settles on a generic one
    for _ in 0..10 {
        let got = client
            .query(&stmt, &[&"e", &1_i64, &workflows, &queues, &limit])
            .await
            .unwrap();
        assert!(got.is_empty());
    }
    db.exec("insert into spool.runs (workflow) select 'noop' from generate_series(1, 20000)")
        .await;
    let tx = client.transaction().await.unwrap();
    let claimed = tx
        .query(&stmt, &[&"e", &1_i64, &workflows, &queues, &limit])
        .await
        .unwrap()
        .len();
    let read: i64 = tx
        .query_one(
            "select coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
               from pg_stat_xact_user_tables where relid = 'spool.runs'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    assert_eq!(claimed, BATCH, "the claim takes a full batch");
    assert!(
        read <= PER_WRITE as i64 * BATCH as i64,
        "a claim of {BATCH} runs planned on an empty queue read {read} rows of spool.runs"
    );
}
