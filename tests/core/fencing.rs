use chrono::Utc;
use serde_json::json;
use spool::db::runs::{self, Claimant, Finish, Outcome};
use spool::db::steps::{self, FinishedStep, StepWrite};
use spool::db::DbError;

use std::time::Duration;

use crate::common::{wait_until, TestDb};

fn step(output: &serde_json::Value) -> FinishedStep<'_> {
    FinishedStep {
        step: 1,
        name: "s",
        output: Some(output),
        error: None,
        chunks: &[],
        started_at: Utc::now(),
    }
}

/// Step 1 of `run` at `epoch` (one chunk), as the batcher sends it.
fn step_write(run: &str, epoch: i64) -> StepWrite {
    StepWrite {
        run_id: run.into(),
        claim_epoch: epoch,
        step: 1,
        name: "s".into(),
        output: Some(json!(1)),
        error: None,
        chunks: vec!["c".into()],
        started_at: Utc::now(),
    }
}

/// Executor `e`, incarnation 1, serving every queue.
fn first_incarnation(workflows: &[String]) -> Claimant<'_> {
    Claimant {
        executor_id: "e",
        incarnation: 1,
        workflows,
        queues: None,
    }
}

#[tokio::test]
async fn a_stale_claim_epoch_can_neither_record_a_step_nor_complete_the_run() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (id, workflow) values ('r1', 'noop');",
    )
    .await;
    let client = db.client().await;
    let workflows = vec!["noop".to_string()];
    let who = first_incarnation(&workflows);
    let one = json!(1);
    let first = runs::claim(&client, &who, 1).await.unwrap().remove(0);
    assert_eq!(first.claim_epoch, 1);

    // The executor restarts (new incarnation) and takes the run back: epoch 2.
    db.exec("update spool.executors set incarnation = 2 where id = 'e'")
        .await;
    let retaken = runs::reclaim_owned(&client, "e", 2, &[]).await.unwrap();
    assert_eq!(retaken.len(), 1);
    assert_eq!(retaken[0].run.claim_epoch, 2);
    assert_eq!(retaken[0].run.attempt, 2);

    // The zombie of epoch 1 tries to write.
    let stale_step = steps::record_step_if_owned(&client, "r1", 1, step(&one)).await;
    assert!(
        matches!(stale_step, Err(DbError::Lost(_))),
        "{stale_step:?}"
    );
    let stale_finish = runs::finish_if_owned(
        &client,
        "r1",
        1,
        Outcome::Succeeded,
        Some(&json!("zombie")),
        None,
    )
    .await;
    assert!(
        matches!(stale_finish, Err(DbError::Lost(_))),
        "{stale_finish:?}"
    );
    let stale_release = runs::release_if_owned(&client, "r1", 1).await;
    assert!(matches!(stale_release, Err(DbError::Lost(_))));
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs")
            .await,
        0
    );
    assert_eq!(db.status("r1").await, "running");

    // The current owner's writes go through, exactly once.
    steps::record_step_if_owned(&client, "r1", 2, step(&one))
        .await
        .unwrap();
    runs::finish_if_owned(
        &client,
        "r1",
        2,
        Outcome::Succeeded,
        Some(&json!("ok")),
        None,
    )
    .await
    .unwrap();
    let again =
        runs::finish_if_owned(&client, "r1", 2, Outcome::Failed, None, Some(&json!({}))).await;
    assert!(
        matches!(again, Err(DbError::Lost(_))),
        "one terminal transition only"
    );
    let run = runs::get_run(&client, "r1").await.unwrap().unwrap();
    assert_eq!(run.status, "succeeded");
    assert_eq!(run.output, Some(json!("ok")));
}

#[tokio::test]
async fn a_superseded_incarnation_cannot_recover_runs() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows, incarnation) values ('e', '{noop}', 3);
         insert into spool.runs (id, workflow, status, executor_id, incarnation, claim_epoch, attempt)
              values ('r1', 'noop', 'running', 'e', 2, 1, 1);",
    )
    .await;
    let client = db.client().await;
    assert!(runs::reclaim_owned(&client, "e", 2, &[])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        runs::reclaim_owned(&client, "e", 3, &[])
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn batched_writes_fence_each_run_by_its_own_claim_epoch() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (id, workflow, status, executor_id, incarnation, claim_epoch, attempt)
              values ('cur', 'noop', 'running', 'e', 1, 3, 3), ('old', 'noop', 'running', 'e', 1, 5, 5)",
    )
    .await;
    let client = db.client().await;
    // one batch: the current owner of 'cur' and a stale writer of 'old' (epoch 4 < 5)
    let results =
        steps::record_steps_if_owned(&client, &[step_write("cur", 3), step_write("old", 4)])
            .await
            .unwrap();
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(DbError::Lost(_))),
        "{:?}",
        results[1]
    );
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'old'")
            .await,
        0
    );
    // the same write retried (its reply was lost) is recognised as ours
    let again = steps::record_steps_if_owned(&client, &[step_write("cur", 3)])
        .await
        .unwrap();
    assert!(again[0].is_ok());
    // a step already there fails the batch statement on the primary key; each write then goes
    // alone: ours is recorded, and a step someone else recorded (by hand, at another epoch)
    // is lost for this writer
    db.exec(
        "insert into spool.runs (id, workflow, status, executor_id, incarnation, claim_epoch, attempt)
              values ('hand', 'noop', 'running', 'e', 1, 2, 2);
         insert into spool.operation_outputs (run_id, step, name, output, claim_epoch, started_at)
              values ('hand', 1, 's', '1', 1, now())",
    )
    .await;
    let second = StepWrite {
        step: 2,
        ..step_write("cur", 3)
    };
    let mixed = steps::record_steps_if_owned(&client, &[second, step_write("hand", 2)])
        .await
        .unwrap();
    assert!(mixed[0].is_ok(), "{:?}", mixed[0]);
    assert!(matches!(mixed[1], Err(DbError::Lost(_))), "{:?}", mixed[1]);
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'cur'")
            .await,
        2
    );

    let finish = |id: &str, epoch: i64| Finish {
        id: id.into(),
        claim_epoch: epoch,
        outcome: Outcome::Succeeded,
        output: Some(json!("ok")),
        error: None,
    };
    let results = runs::finish_many_if_owned(&client, &[finish("cur", 3), finish("old", 4)])
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(DbError::Lost(_))));
    assert_eq!(db.status("cur").await, "succeeded");
    assert_eq!(db.status("old").await, "running");
    let finished_at = db
        .scalar_i64("select extract(epoch from finished_at)::int8 * 1000000 + extract(microseconds from finished_at)::int8 from spool.runs where id = 'cur'")
        .await;
    // the same finish again (a retry after a lost reply) is recognised, and changes nothing
    let twice = runs::finish_many_if_owned(&client, &[finish("cur", 3)])
        .await
        .unwrap();
    assert!(twice[0].is_ok(), "{twice:?}");
    assert_eq!(
        db.scalar_i64("select extract(epoch from finished_at)::int8 * 1000000 + extract(microseconds from finished_at)::int8 from spool.runs where id = 'cur'")
            .await,
        finished_at,
        "one terminal transition only"
    );
    // another outcome at the same epoch is a second transition: refused
    let other = Finish {
        outcome: Outcome::Failed,
        ..finish("cur", 3)
    };
    let refused = runs::finish_many_if_owned(&client, &[other]).await.unwrap();
    assert!(
        matches!(refused[0], Err(DbError::Lost(_))),
        "one terminal transition only"
    );
}

#[tokio::test]
async fn a_superseded_incarnation_cannot_write_even_before_its_successor_reclaims() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (id, workflow) values ('r1', 'noop'), ('r2', 'noop');",
    )
    .await;
    let client = db.client().await;
    let workflows = vec!["noop".to_string()];
    let who = first_incarnation(&workflows);
    let claimed = runs::claim(&client, &who, 2).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let one = json!(1);
    // The successor has registered, but has not taken the runs back yet: their epochs still
    // match what the old incarnation holds.
    db.exec("update spool.executors set incarnation = 2 where id = 'e'")
        .await;
    let stale = steps::record_step_if_owned(&client, "r1", 1, step(&one)).await;
    assert!(matches!(stale, Err(DbError::Lost(_))), "{stale:?}");
    let batch = steps::record_steps_if_owned(
        &client,
        &[StepWrite {
            run_id: "r2".into(),
            claim_epoch: 1,
            step: 1,
            name: "s".into(),
            output: Some(one.clone()),
            error: None,
            chunks: vec![],
            started_at: Utc::now(),
        }],
    )
    .await
    .unwrap();
    assert!(matches!(batch[0], Err(DbError::Lost(_))), "{:?}", batch[0]);
    let finish = |id: &str| Finish {
        id: id.into(),
        claim_epoch: 1,
        outcome: Outcome::Succeeded,
        output: Some(json!("zombie")),
        error: None,
    };
    let finished = runs::finish_many_if_owned(&client, &[finish("r1"), finish("r2")])
        .await
        .unwrap();
    assert!(finished.iter().all(|f| matches!(f, Err(DbError::Lost(_)))));
    let single = runs::finish_if_owned(&client, "r1", 1, Outcome::Succeeded, None, None).await;
    assert!(matches!(single, Err(DbError::Lost(_))), "{single:?}");
    let released = runs::release_if_owned(&client, "r2", 1).await;
    assert!(matches!(released, Err(DbError::Lost(_))), "{released:?}");
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs")
            .await,
        0
    );
    // The successor takes both back and writes normally.
    let retaken = runs::reclaim_owned(&client, "e", 2, &[]).await.unwrap();
    assert_eq!(retaken.len(), 2);
    steps::record_step_if_owned(&client, "r1", 2, step(&one))
        .await
        .unwrap();
    runs::finish_if_owned(&client, "r1", 2, Outcome::Succeeded, None, None)
        .await
        .unwrap();
    assert_eq!(db.status("r1").await, "succeeded");
    assert_eq!(db.status("r2").await, "running");
}

/// `reclaim_owned` reads the executors row `for share`, like the claim: a superseded
/// incarnation's reclaim that starts while its successor is registering waits for it, then takes
/// nothing (without the lock it committed just before its successor and re-owned the runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_incarnations_reclaim_serializes_with_its_successor_and_takes_nothing() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (id, workflow) values ('r1', 'noop');",
    )
    .await;
    let workflows = vec!["noop".to_string()];
    runs::claim(&db.client().await, &first_incarnation(&workflows), 1)
        .await
        .unwrap();

    // The successor registers (incarnation 2) in a transaction that has not committed yet.
    let successor = spool::db::connect_dedicated(&db.target, "successor", None)
        .await
        .unwrap();
    successor
        .client
        .batch_execute("begin; update spool.executors set incarnation = 2 where id = 'e';")
        .await
        .unwrap();

    // The old incarnation, still running, recovers its runs meanwhile.
    let pool = db.pool.clone();
    let old = tokio::spawn(async move {
        let client = pool.get().await.unwrap();
        runs::reclaim_owned(&client, "e", 1, &[])
            .await
            .unwrap()
            .len()
    });
    crate::common::wait_until(
        "the old incarnation's reclaim to wait for the registration (or to finish)",
        std::time::Duration::from_secs(10),
        || {
            let db = &db;
            let finished = old.is_finished();
            async move {
                let waiting = db
                    .scalar_i64(
                        "select count(*) from pg_stat_activity
                          where wait_event_type = 'Lock' and query like '%spool.runs%'",
                    )
                    .await;
                (finished || waiting > 0).then_some(())
            }
        },
    )
    .await;
    successor.client.batch_execute("commit").await.unwrap();
    assert_eq!(
        old.await.unwrap(),
        0,
        "a superseded incarnation re-owned runs while its successor was registering"
    );
}

/// A finish whose commit succeeded but whose reply was lost is retried (the batcher retries
/// connectivity errors): the retry must recognise its own committed transition, not report the
/// run lost.
#[tokio::test]
async fn a_retried_finish_recognises_its_own_committed_transition() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (id, workflow) values ('r1', 'noop'), ('r2', 'noop');",
    )
    .await;
    let client = db.client().await;
    let workflows = vec!["noop".to_string()];
    let claimed = runs::claim(&client, &first_incarnation(&workflows), 2)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let finishes: Vec<Finish> = ["r1", "r2"]
        .iter()
        .map(|id| Finish {
            id: id.to_string(),
            claim_epoch: 1,
            outcome: Outcome::Succeeded,
            output: Some(json!({"ok": true})),
            error: None,
        })
        .collect();
    let first = runs::finish_many_if_owned(&client, &finishes)
        .await
        .unwrap();
    assert!(first.iter().all(Result::is_ok));
    // the same batch again, as after a lost reply
    let retry = runs::finish_many_if_owned(&client, &finishes)
        .await
        .unwrap();
    assert!(
        retry.iter().all(Result::is_ok),
        "the retry reported its own committed finish as lost: {retry:?}"
    );
    // a different outcome at the same epoch is not ours
    let other = Finish {
        outcome: Outcome::Failed,
        ..finishes[0].clone()
    };
    let refused = runs::finish_many_if_owned(&client, &[other]).await.unwrap();
    assert!(matches!(refused[0], Err(DbError::Lost(_))), "{refused:?}");
}

/// A batched step write that reaches its run while another transaction holds the run waits for
/// it, then judges the run as that transaction left it: a re-claim (a new epoch) makes the
/// write lost and records nothing; a cancel request leaves it recorded, with the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_step_write_judges_its_run_as_a_concurrent_transaction_left_it() {
    let db = TestDb::new().await;
    db.exec(
        "insert into spool.executors (id, workflows) values ('e', '{noop}');
         insert into spool.runs (id, workflow, status, executor_id, incarnation, claim_epoch, attempt)
              values ('reclaimed', 'noop', 'running', 'e', 1, 3, 3),
                     ('cancelled', 'noop', 'running', 'e', 1, 3, 3)",
    )
    .await;
    for (run, change) in [
        (
            "reclaimed",
            "update spool.runs set claim_epoch = 4, attempt = 4 where id = 'reclaimed'",
        ),
        (
            "cancelled",
            "update spool.runs set cancel_requested = true where id = 'cancelled'",
        ),
    ] {
        let mut other = db.client().await;
        let tx = other.transaction().await.unwrap();
        tx.execute("select 1 from spool.runs where id = $1 for update", &[&run])
            .await
            .unwrap();
        let writer = db.client().await;
        let write = tokio::spawn({
            let w = step_write(run, 3);
            async move { steps::record_steps_if_owned(&writer, &[w]).await }
        });
        wait_until(
            "the step write to wait for the run's lock",
            Duration::from_secs(10),
            || async {
                (db.scalar_i64(
                    "select count(*) from pg_stat_activity
                      where wait_event_type = 'Lock' and query like '%operation_outputs%'",
                )
                .await
                    == 1)
                    .then_some(())
            },
        )
        .await;
        tx.execute(change, &[]).await.unwrap();
        tx.commit().await.unwrap();
        let results = write.await.unwrap().unwrap();
        let recorded = db
            .scalar_i64(&format!(
                "select count(*) from spool.operation_outputs where run_id = '{run}'"
            ))
            .await;
        if run == "reclaimed" {
            assert!(
                matches!(results[0], Err(DbError::Lost(_))),
                "{:?}",
                results[0]
            );
            assert_eq!(recorded, 0, "nothing recorded under the old epoch");
        } else {
            let outcome = results[0].as_ref().expect("recorded");
            assert!(
                outcome.cancel_requested,
                "the write sees the cancel request"
            );
            assert_eq!(recorded, 1);
        }
    }
}
