use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{json, Value};
use spool::{Registry, RunContext, StepError, StepInfo, WorkflowError};

use crate::common::{wait_terminal, wait_until, TestDb};

/// Records one execution of a step in a table the test owns, then maybe hangs (the crash point).
async fn side_effect(pool: &Pool, step: &StepInfo, hang: bool) -> Result<String, StepError> {
    pool.get()
        .await
        .unwrap()
        .execute(
            "insert into side_effects (run_id, step, attempt) values ($1, $2, $3)",
            &[&step.run_id, &step.name, &step.attempt],
        )
        .await
        .unwrap();
    if hang {
        std::future::pending::<()>().await;
    }
    Ok(format!("{} done", step.name))
}

/// A workflow of four steps named by `names`; step 3 hangs on the first attempt.
fn four_steps(pool: Pool, names: [&'static str; 4]) -> Registry {
    let mut r = Registry::new();
    let pool = Arc::new(pool);
    r.register("four", move |ctx: RunContext, _input: Value| {
        let pool = pool.clone();
        async move {
            let mut outputs = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let p = pool.clone();
                let out: String = ctx
                    .step(name, move |s| {
                        let p = p.clone();
                        async move { side_effect(&p, &s, i == 2 && s.claim_epoch == 1).await }
                    })
                    .await?;
                outputs.push(out);
            }
            Ok::<_, WorkflowError>(json!(outputs))
        }
    });
    r
}

async fn prepare(db: &TestDb) {
    db.exec("create table side_effects (run_id text, step text, attempt int)")
        .await;
    db.exec("insert into spool.runs (id, workflow) values ('r', 'four')")
        .await;
}

async fn wait_side_effect(db: &TestDb, step: &str) {
    wait_until(
        &format!("step {step} to start"),
        Duration::from_secs(30),
        || async {
            (db.scalar_i64(&format!(
                "select count(*) from side_effects where step = '{step}'"
            ))
            .await
                > 0)
            .then_some(())
        },
    )
    .await;
}

async fn executions(db: &TestDb, step: &str) -> i64 {
    db.scalar_i64(&format!(
        "select count(*) from side_effects where step = '{step}'"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_after_step_two_resumes_at_step_three_and_runs_steps_one_and_two_once() {
    let db = TestDb::new().await;
    prepare(&db).await;
    let names = ["s1", "s2", "s3", "s4"];
    let first = db.executor("x", four_steps(db.pool.clone(), names)).await;
    wait_side_effect(&db, "s3").await;
    first.abort(); // crash: nothing released, the run stays owned by "x"

    let second = db.executor("x", four_steps(db.pool.clone(), names)).await;
    assert_eq!(
        wait_terminal(&db, "r", Duration::from_secs(30)).await,
        "succeeded"
    );
    assert_eq!(executions(&db, "s1").await, 1, "memoized step 1 ran again");
    assert_eq!(executions(&db, "s2").await, 1, "memoized step 2 ran again");
    assert_eq!(
        executions(&db, "s3").await,
        2,
        "the step in flight runs again (at least once)"
    );
    assert_eq!(executions(&db, "s4").await, 1);
    let client = db.client().await;
    let run = spool::db::runs::get_run(&client, "r")
        .await
        .unwrap()
        .unwrap();
    // steps 1 and 2 were recorded in the crashed attempt: the crash is not charged to the run
    assert_eq!(run.attempt, 1);
    assert_eq!(run.claim_epoch, 2);
    assert_eq!(
        run.output,
        Some(json!(["s1 done", "s2 done", "s3 done", "s4 done"]))
    );
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'r'")
            .await,
        4
    );
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_step_on_replay_fails_the_run_with_a_non_determinism_error() {
    let db = TestDb::new().await;
    prepare(&db).await;
    let first = db
        .executor("x", four_steps(db.pool.clone(), ["s1", "s2", "s3", "s4"]))
        .await;
    wait_side_effect(&db, "s3").await;
    first.abort();

    // The code changed between attempts: step 2 has a new name.
    let second = db
        .executor(
            "x",
            four_steps(db.pool.clone(), ["s1", "s2-renamed", "s3", "s4"]),
        )
        .await;
    assert_eq!(
        wait_terminal(&db, "r", Duration::from_secs(30)).await,
        "failed"
    );
    let error: Value = db
        .client()
        .await
        .query_one("select error from spool.runs where id = 'r'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(error["code"], "non_determinism");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("\"s2\"") && message.contains("\"s2-renamed\""),
        "{message}"
    );
    assert_eq!(
        executions(&db, "s2-renamed").await,
        0,
        "the renamed step never ran"
    );
    second.shutdown().await.unwrap();
}
