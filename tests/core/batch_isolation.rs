//! One bad value must not fail a whole batch: the executor group-commits the step records and
//! terminal transitions of many runs in one statement, and a value PostgreSQL refuses (U+0000 in
//! jsonb or text, or a row a constraint rejects) must fail only the run that produced it. The
//! other runs of the batch finish on their first attempt, with no re-claim and no step re-run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use spool::{Registry, RunContext, StepError, WorkflowError};
use tokio::sync::watch;

use crate::common::{settings, wait_terminal, wait_until, TestDb};

/// What a run of the test workflow does wrong, if anything.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Fault {
    None,
    /// Its first step returns the string "a\u{0}b".
    StepOutput,
    /// Its first step returns an object with U+0000 in a key, two levels down.
    StepKey,
    /// Its first step fails with an error message holding U+0000.
    StepError,
    /// Its first step emits a chunk holding U+0000.
    StepChunk,
    /// It emits a chunk holding U+0000 between steps.
    LooseChunk,
    /// It returns an output holding U+0000 (no step holds one).
    RunOutput,
    /// Its first step is named `refused`, which the test's own CHECK constraint refuses.
    RefusedName,
    /// It returns `{"answer": "refused"}`, which the test's own CHECK constraint refuses.
    RefusedEnd,
}

#[derive(Deserialize)]
struct Input {
    fault: Fault,
}

/// Holds every run's first step until all of them are executing, so their writes share batches.
struct Gate {
    arrived: AtomicUsize,
    open: watch::Sender<bool>,
}

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            arrived: AtomicUsize::new(0),
            open: watch::Sender::new(false),
        })
    }

    async fn pass(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        open.wait_for(|open| *open).await.expect("gate kept");
    }
}

/// `batch`: a gated first step (where the fault is), then two ordinary steps.
fn registry(gate: Arc<Gate>) -> Registry {
    let mut r = Registry::new();
    r.register("batch", move |ctx: RunContext, input: Input| {
        let gate = gate.clone();
        async move {
            let fault = input.fault;
            let name = if fault == Fault::RefusedName {
                "refused"
            } else {
                "work"
            };
            let ctx2 = ctx.clone();
            let first: Value = ctx
                .step(name, move |_| {
                    let gate = gate.clone();
                    let ctx = ctx2.clone();
                    async move {
                        gate.pass().await;
                        match fault {
                            Fault::StepOutput => Ok(json!("a\u{0}b")),
                            Fault::StepKey => Ok(json!({"outer": [1, {"in\u{0}ner": 2}]})),
                            Fault::StepError => Err(StepError::fatal("bad \u{0} news")),
                            Fault::StepChunk => {
                                ctx.emit("fine").await;
                                ctx.emit("a\u{0}b").await;
                                Ok(json!("ok"))
                            }
                            _ => Ok(json!("ok")),
                        }
                    }
                })
                .await?;
            if fault == Fault::LooseChunk {
                ctx.emit("between\u{0}steps").await;
            }
            for name in ["more-1", "more-2"] {
                ctx.step(name, |_| async { Ok(json!(name)) }).await?;
            }
            let output = match fault {
                Fault::RunOutput => json!({"answer": "a\u{0}b"}),
                Fault::RefusedEnd => json!({"answer": "refused"}),
                _ => json!({"first": first}),
            };
            Ok::<_, WorkflowError>(output)
        }
    });
    r
}

/// How a run ended: (status, attempt, error code, error message).
type Ending = (String, i32, Option<String>, Option<String>);

/// Enqueues `runs` (id → fault) in one statement, executes them together on one executor and
/// returns how each ended, by id.
async fn run_together(db: &TestDb, runs: &[(String, &str)]) -> Vec<(String, Ending)> {
    let values: Vec<String> = runs
        .iter()
        .map(|(id, fault)| format!("('{id}', 'batch', '{{\"fault\": \"{fault}\"}}')"))
        .collect();
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input) values {}",
        values.join(", ")
    ))
    .await;
    let gate = Gate::new();
    let mut s = settings("x");
    s.concurrency = 64;
    let executor = db.executor_with(s, registry(gate.clone())).await;
    wait_until(
        "every run to reach its first step",
        Duration::from_secs(30),
        || async { (gate.arrived.load(Ordering::SeqCst) >= runs.len()).then_some(()) },
    )
    .await;
    gate.open.send_replace(true);
    for (id, _) in runs {
        wait_terminal(db, id, Duration::from_secs(60)).await;
    }
    executor.shutdown().await.unwrap();
    let rows = db
        .client()
        .await
        .query(
            "select id, status, attempt, error->>'code', error->>'message'
               from spool.runs order by id",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect()
}

/// Twenty good runs `good-00` … `good-19`.
fn good_runs() -> Vec<(String, &'static str)> {
    (0..20).map(|i| (format!("good-{i:02}"), "none")).collect()
}

fn assert_good_runs_succeeded_first_time(endings: &[(String, Ending)]) {
    let first_time = ("succeeded".to_string(), 1, None, None);
    let others: Vec<_> = endings
        .iter()
        .filter(|(id, ending)| id.starts_with("good-") && *ending != first_time)
        .collect();
    assert!(
        others.is_empty(),
        "good runs that did not succeed on their first attempt: {others:?}\nall runs: {endings:?}"
    );
}

fn ending<'a>(endings: &'a [(String, Ending)], id: &str) -> &'a Ending {
    &endings.iter().find(|(i, _)| i == id).unwrap().1
}

/// The run failed at once (attempt 1) with `invalid_output`, and the message names `what`.
fn assert_invalid_output(endings: &[(String, Ending)], id: &str, what: &str) {
    let (status, attempt, code, message) = ending(endings, id);
    assert_eq!(
        (status.as_str(), *attempt, code.as_deref()),
        ("failed", 1, Some("invalid_output")),
        "run {id}: {message:?}"
    );
    let message = message.as_deref().unwrap_or("");
    assert!(
        message.contains(what),
        "run {id}: {message:?} lacks {what:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_output_holding_nul_fails_only_its_own_run() {
    let db = TestDb::new().await;
    let mut runs = good_runs();
    runs.push(("bad".into(), "step_output"));
    let endings = run_together(&db, &runs).await;

    assert_good_runs_succeeded_first_time(&endings);
    assert_invalid_output(&endings, "bad", "step 1 (\"work\")");
    assert_invalid_output(&endings, "bad", "U+0000");
    assert_invalid_output(&endings, "bad", "PostgreSQL");
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'bad'")
            .await,
        0,
        "the refused step must not be recorded"
    );
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id like 'good-%'")
            .await,
        60
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_anywhere_a_run_writes_fails_only_that_run() {
    let db = TestDb::new().await;
    let mut runs = good_runs();
    for fault in [
        "step_key",
        "step_error",
        "step_chunk",
        "loose_chunk",
        "run_output",
    ] {
        runs.push((format!("bad-{}", fault.replace('_', "-")), fault));
    }
    let endings = run_together(&db, &runs).await;

    assert_good_runs_succeeded_first_time(&endings);
    assert_invalid_output(&endings, "bad-step-key", "step 1 (\"work\")");
    assert_invalid_output(&endings, "bad-step-key", r#"$["outer"][1]["in\0ner"]"#);
    assert_invalid_output(&endings, "bad-step-error", "step 1 (\"work\")");
    assert_invalid_output(&endings, "bad-step-chunk", "step 1 (\"work\")");
    assert_invalid_output(&endings, "bad-step-chunk", "chunk");
    assert_invalid_output(&endings, "bad-loose-chunk", "chunk");
    assert_invalid_output(&endings, "bad-run-output", r#"$["answer"]"#);
    // A refused step is not recorded; a run refused only at its end keeps its steps.
    assert_eq!(
        db.scalar_i64(
            "select count(*) from spool.operation_outputs
              where run_id in ('bad-step-key', 'bad-step-error', 'bad-step-chunk')"
        )
        .await,
        0
    );
    assert_eq!(
        db.scalar_i64(
            "select count(*) from spool.operation_outputs where run_id = 'bad-run-output'"
        )
        .await,
        3
    );
}

/// Not about U+0000: the database itself refuses one write of a shared batch (CHECKs this test
/// adds to its own database: one on a step, one on a run's end), so the batch statement fails.
/// The executor retries the batch's writes one by one; only the refused runs fail, at once,
/// instead of being re-claimed until they are dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_database_refuses_fails_only_its_own_run() {
    let db = TestDb::new().await;
    db.exec(
        "alter table spool.operation_outputs
           add constraint test_refuses_step check (name <> 'refused');
         alter table spool.runs
           add constraint test_refuses_end check (output->>'answer' is distinct from 'refused')",
    )
    .await;
    let mut runs = good_runs();
    runs.push(("refused-step".into(), "refused_name"));
    runs.push(("refused-end".into(), "refused_end"));
    let endings = run_together(&db, &runs).await;

    assert_good_runs_succeeded_first_time(&endings);
    assert_invalid_output(&endings, "refused-step", "step 1 (\"refused\")");
    assert_invalid_output(&endings, "refused-step", "test_refuses_step");
    assert_invalid_output(&endings, "refused-end", "the run's end (succeeded)");
    assert_invalid_output(&endings, "refused-end", "test_refuses_end");
    assert_eq!(
        db.scalar_i64("select count(*) from spool.operation_outputs where run_id = 'refused-end'")
            .await,
        3,
        "a run refused at its end keeps its recorded steps"
    );
}
