//! Executes one claimed run: checks the attempt limit and cancellation, loads its memoized
//! steps, runs the workflow and records the run's one terminal transition. An end PostgreSQL
//! cannot store (U+0000 in the output or error, or a value the database refuses) becomes a
//! `failed` end with `invalid_output`, so it neither fails the finish batch nor loops.
//!
//! Architecture invariant: no pooled connection, transaction or row lock is held while workflow
//! code runs; each database call takes a connection for that call only.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::FutureExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::batcher::Writes;
use crate::db::runs::{Finish, Outcome, Run};
use crate::db::{self, DbError};
use crate::workflow::{
    nul_path, ChunkSink, DiscardChunks, Registry, RunContext, RunEnd, RunIdentity, WorkflowError,
    NUL_REFUSED,
};

use super::metrics::Metrics;

/// Makes the chunk sink of one run attempt.
pub type ChunkSinkFactory = Arc<dyn Fn(&RunIdentity) -> Arc<dyn ChunkSink> + Send + Sync>;

pub fn discard_chunks() -> ChunkSinkFactory {
    Arc::new(|_| Arc::new(DiscardChunks))
}

/// What every run task shares.
pub struct RunnerDeps {
    pub pool: Pool,
    pub registry: Registry,
    pub chunks: ChunkSinkFactory,
    pub metrics: Arc<Metrics>,
    pub executor_id: String,
    /// Batched, fenced step records and terminal transitions.
    pub writes: Writes,
    /// How long reads keep retrying while the database is unreachable.
    pub db_patience: Duration,
}

/// Runs `run` to its end (or until it is lost). Never panics: a panicking workflow fails the run.
pub async fn execute(run: Run, deps: Arc<RunnerDeps>, cancel: CancellationToken) {
    let id = run.id.clone();
    let epoch = run.claim_epoch;
    let sink = (deps.chunks)(&RunIdentity::of(&run));
    let (mut outcome, mut output, mut error) = match decide(run, &deps, sink.clone(), cancel).await
    {
        Some(end) => storable(end),
        None => return,
    };
    // every chunk acknowledged before the end is committed ...
    sink.flush().await;
    let submit = |outcome: Outcome, output: &Option<Value>, error: &Option<Value>| {
        deps.writes.finishes.submit(Finish {
            id: id.clone(),
            claim_epoch: epoch,
            outcome,
            output: output.clone(),
            error: error.clone(),
        })
    };
    let mut finish = submit(outcome, &output, &error).await;
    if let Err(e) = &finish {
        if e.is_value_refused() {
            // Nothing about this run will change the database's mind: end it failed, saying why.
            (outcome, output, error) = invalid_output(format!(
                "the database refused to store the run's end ({}): {e}",
                outcome.as_str()
            ));
            finish = submit(outcome, &output, &error).await;
        }
    }
    match finish {
        Ok(()) => {
            deps.metrics.finished(outcome);
            tracing::debug!(run = %id, status = outcome.as_str(), "run finished");
            // ... and the end event published only after it is committed
            let payload = output.or(error).unwrap_or(Value::Null);
            sink.finish(match outcome {
                Outcome::Succeeded => RunEnd::Done(payload),
                Outcome::Cancelled => RunEnd::Cancelled(payload),
                Outcome::Failed | Outcome::Dead => RunEnd::Failed(payload),
            })
            .await;
        }
        Err(DbError::Lost(_)) => {
            deps.metrics.lost();
            tracing::warn!(run = %id, "run was taken over before it could finish here; dropped")
        }
        Err(e) => {
            tracing::warn!(run = %id, error = %e, "cannot record the end of the run; it stays owned and is recovered later")
        }
    }
}

type End = (Outcome, Option<Value>, Option<Value>);

fn invalid_output(message: String) -> End {
    (
        Outcome::Failed,
        None,
        Some(WorkflowError::InvalidOutput(message).to_json()),
    )
}

/// `end`, or an `invalid_output` failure when its output or error holds U+0000.
fn storable(end: End) -> End {
    if let Some(path) = end.1.as_ref().and_then(nul_path) {
        return invalid_output(format!(
            "the workflow returned an output holding U+0000 at {path}; {NUL_REFUSED}"
        ));
    }
    if let Some(path) = end.2.as_ref().and_then(nul_path) {
        return invalid_output(format!(
            "the run's error holds U+0000 at {path}; {NUL_REFUSED}"
        ));
    }
    end
}

/// Runs the workflow and decides the terminal transition, or `None` when there is nothing to
/// record (the run was lost, or the database is unreachable and recovery will retry).
async fn decide(
    run: Run,
    deps: &RunnerDeps,
    sink: Arc<dyn ChunkSink>,
    cancel: CancellationToken,
) -> Option<End> {
    if run.attempt > run.max_attempts {
        let message = format!(
            "gave up after {} attempts (max_attempts {}): the run was claimed {} times without finishing, which usually means it crashed or stranded its executor each time",
            run.attempt - 1,
            run.max_attempts,
            run.attempt - 1
        );
        return Some((
            Outcome::Dead,
            None,
            Some(json!({"code": "attempts_exhausted", "message": message})),
        ));
    }
    if !run.undecodable.is_empty() {
        return Some(undecodable("the run's row", &run.undecodable));
    }
    if run.cancel_requested {
        return Some(cancelled());
    }
    let Some(workflow) = deps.registry.get(&run.workflow).cloned() else {
        // The claim only takes workflows this executor registered; this is a safety net.
        let message = format!(
            "no workflow named {:?} is registered on executor {}",
            run.workflow, deps.executor_id
        );
        return Some((
            Outcome::Failed,
            None,
            Some(json!({"code": "unknown_workflow", "message": message})),
        ));
    };
    // The first claim of a run (epoch 1) cannot have memoized steps: skip the read.
    let memo = if run.claim_epoch == 1 {
        Ok(Vec::new())
    } else {
        db::with_patience(deps.db_patience, || async {
            let client = deps.pool.get().await?;
            db::steps::load_steps(&client, &run.id).await
        })
        .await
    };
    let memo = match memo {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(run = %run.id, error = %e, "cannot load memoized steps; the run is recovered later");
            return None;
        }
    };
    if let Some(bad) = memo.iter().find(|s| !s.undecodable.is_empty()) {
        return Some(undecodable(
            &format!("memoized step {} ({:?})", bad.step, bad.name),
            &bad.undecodable,
        ));
    }
    let identity = RunIdentity::of(&run);
    let ctx = RunContext::new(
        identity,
        deps.writes.steps.clone(),
        memo,
        run.cancel_requested,
        cancel,
        sink,
    );
    let result = AssertUnwindSafe(workflow(ctx.clone(), run.input))
        .catch_unwind()
        .await;
    let end = end_of(result, &run.id, deps);
    // A value that could not be stored fails the run, even when the workflow caught the step's
    // error and carried on (or stopped another way).
    match (end, ctx.refusal()) {
        (Some(_), Some(refused)) => Some((Outcome::Failed, None, Some(refused.to_json()))),
        (end, _) => end,
    }
}

type Caught = Result<Result<Value, WorkflowError>, Box<dyn std::any::Any + Send>>;

/// The terminal transition for what the workflow returned (or how it panicked).
fn end_of(result: Caught, run_id: &str, deps: &RunnerDeps) -> Option<End> {
    match result {
        Ok(Ok(output)) => Some((Outcome::Succeeded, Some(output), None)),
        Ok(Err(WorkflowError::Cancelled)) => Some(cancelled()),
        Ok(Err(WorkflowError::CancelledWith(partial))) => Some((
            Outcome::Cancelled,
            None,
            Some(json!({
                "code": "cancelled",
                "message": "cancelled while running; what it produced so far is in partial",
                "partial": partial,
            })),
        )),
        Ok(Err(WorkflowError::Lost)) => {
            deps.metrics.lost();
            tracing::warn!(run = %run_id, "run was taken over; this attempt stops");
            None
        }
        Ok(Err(WorkflowError::Database(e))) => {
            tracing::warn!(run = %run_id, error = %e, "database unreachable; the run is recovered later");
            None
        }
        Ok(Err(e)) => Some((Outcome::Failed, None, Some(e.to_json()))),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Some((
                Outcome::Failed,
                None,
                Some(
                    json!({"code": "panicked", "message": format!("workflow panicked: {message}")}),
                ),
            ))
        }
    }
}

fn cancelled() -> End {
    (
        Outcome::Cancelled,
        None,
        Some(json!({"code": "cancelled", "message": "cancelled at a step boundary"})),
    )
}

/// A row written by hand with values this executor cannot decode: the run fails with a clear
/// error instead of panicking or stalling (the schema's constraints keep most such values out).
fn undecodable(what: &str, notes: &[String]) -> End {
    let message = format!(
        "{what} holds values Spool cannot decode: {}",
        notes.join("; ")
    );
    (
        Outcome::Failed,
        None,
        Some(json!({"code": "undecodable_row", "message": message})),
    )
}
