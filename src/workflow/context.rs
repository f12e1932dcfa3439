//! [`RunContext`]: what a workflow sees of its run while it executes — memoized steps, chunk
//! emission, cancellation and the idempotency key of the step in flight.
//!
//! Steps of one run execute one after another; their numbers come from the order in which the
//! workflow asks for them, which is why replay must ask in the same order.
//!
//! Values PostgreSQL cannot store (U+0000 in a step's output, error or chunks, or in any chunk)
//! are refused here, before they reach the executor's batched writes: the run fails with
//! `invalid_output` and no other run's write is affected.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use tokio_util::sync::CancellationToken;

use super::{nul_path, StepError, WorkflowError, NUL_REFUSED};
use crate::db::steps::{FinishedStep, StepRecord, StepRecorded, StepWrite};
use crate::executor::batcher::Batcher;

/// Which attempt of which run a context belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdentity {
    pub run_id: String,
    /// The row's `enqueue_seq`: unique per inserted row, so a run id deleted and inserted again
    /// is told apart from its earlier incarnation (its live output goes to other subjects).
    pub enqueue_seq: i64,
    pub claim_epoch: i64,
    pub attempt: i32,
}

impl RunIdentity {
    /// The identity of the attempt that claimed `run`.
    pub fn of(run: &crate::db::runs::Run) -> Self {
        Self {
            run_id: run.id.clone(),
            enqueue_seq: run.enqueue_seq,
            claim_epoch: run.claim_epoch,
            attempt: run.attempt,
        }
    }
}

/// How a run ended, as its live output announces it.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    Done(Value),
    Failed(Value),
    Cancelled(Value),
}

/// Where a run attempt's chunks go; the live-output publisher implements it.
///
/// None of these calls fails the run: a sink that cannot publish (NATS down) remembers what it
/// owes and repairs the output when it can; the run itself completes in Postgres regardless.
pub trait ChunkSink: Send + Sync {
    /// Publishes the next chunk of this attempt's output.
    fn emit(&self, chunk: String) -> BoxFuture<'_, ()>;
    /// The output restarts from its first `keep` chunks: a step try that emitted chunks failed
    /// and will be retried.
    fn rewind(&self, keep: usize) -> BoxFuture<'_, ()>;
    /// Waits until every chunk is acknowledged; called before the terminal status is committed.
    fn flush(&self) -> BoxFuture<'_, ()>;
    /// Publishes the end event; called after the terminal status is committed.
    fn finish(&self, end: RunEnd) -> BoxFuture<'_, ()>;
}

/// A sink that drops every chunk (no live output configured).
#[derive(Debug, Default)]
pub struct DiscardChunks;

impl ChunkSink for DiscardChunks {
    fn emit(&self, _chunk: String) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn rewind(&self, _keep: usize) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn finish(&self, _end: RunEnd) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// How a step's retryable errors are retried within one attempt of the run.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 means a retryable error is recorded at once.
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max_backoff);
        // full jitter on the upper half, so retries of many runs spread out
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// What a step's closure knows about itself.
#[derive(Debug, Clone)]
pub struct StepInfo {
    pub run_id: String,
    pub step: i32,
    pub name: String,
    /// The run's attempt: claims charged against it (a re-claim after a crash the run cannot
    /// have caused, or after a release, is not charged).
    pub attempt: i32,
    /// The run's claim epoch: changes on every claim, so a step re-executed after a crash
    /// always sees a higher one.
    pub claim_epoch: i64,
}

impl StepInfo {
    /// Stable across re-executions of this step of this run: hand it to external systems that
    /// deduplicate (payment APIs, outbox tables).
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.run_id, self.step)
    }
}

/// A workflow's view of its run. Cheap to clone.
#[derive(Clone)]
pub struct RunContext {
    inner: Arc<Inner>,
}

struct Inner {
    identity: RunIdentity,
    /// Where finished steps are recorded (the executor's batched, fenced step writes).
    steps: Batcher<StepWrite, StepRecorded>,
    /// Steps recorded by earlier attempts, by number.
    memo: BTreeMap<i32, StepRecord>,
    /// Number of the last step asked for.
    step_counter: AtomicI32,
    /// Set from the run row whenever a step is recorded.
    cancel_requested: AtomicBool,
    /// Cancelled by the executor as soon as it learns the run's cancellation was requested
    /// (while a step runs, too): steps that can stop early wait on [`RunContext::cancelled`].
    cancel: CancellationToken,
    chunks: Arc<dyn ChunkSink>,
    /// Chunks emitted in this attempt so far, replayed ones included.
    emitted: AtomicUsize,
    /// The step in flight, whose chunks are recorded with its output.
    in_flight: Mutex<Option<StepInFlight>>,
    /// The first value of this attempt that could not be stored (why, for the run's error). Once
    /// set, no further step runs and the run fails with `invalid_output`, even if the workflow
    /// caught the step's error.
    refused: Mutex<Option<String>>,
}

struct StepInFlight {
    /// `step 3 ("name")`, for messages.
    label: String,
    chunks: Vec<String>,
}

fn step_label(number: i32, name: &str) -> String {
    format!("step {number} ({name:?})")
}

impl RunContext {
    pub fn new(
        identity: RunIdentity,
        steps: Batcher<StepWrite, StepRecorded>,
        memo: Vec<StepRecord>,
        cancel_requested: bool,
        cancel: CancellationToken,
        chunks: Arc<dyn ChunkSink>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                identity,
                steps,
                memo: memo.into_iter().map(|s| (s.step, s)).collect(),
                step_counter: AtomicI32::new(0),
                cancel_requested: AtomicBool::new(cancel_requested),
                cancel,
                chunks,
                emitted: AtomicUsize::new(0),
                in_flight: Mutex::new(None),
                refused: Mutex::new(None),
            }),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.inner.identity.run_id
    }

    pub fn identity(&self) -> &RunIdentity {
        &self.inner.identity
    }

    /// True once someone asked to cancel the run (seen at a step boundary, or told by the
    /// executor while a step runs).
    pub fn is_cancel_requested(&self) -> bool {
        self.inner.cancel_requested.load(Ordering::Relaxed) || self.inner.cancel.is_cancelled()
    }

    /// Resolves once the run's cancellation is requested: a long step (an LLM generation) waits
    /// on it beside its work and stops early, keeping what it has so far.
    pub async fn cancelled(&self) {
        if self.inner.cancel_requested.load(Ordering::Relaxed) {
            return;
        }
        self.inner.cancel.cancelled().await
    }

    /// Returns `Err(Cancelled)` when cancellation was requested; call it in long loops.
    pub fn check_cancelled(&self) -> Result<(), WorkflowError> {
        if self.is_cancel_requested() {
            Err(WorkflowError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Emits a chunk of live output. Chunks emitted inside a step are memoized with it and
    /// republished when the step is replayed; chunks emitted between steps are emitted again
    /// because the code between steps runs again.
    ///
    /// A chunk holding U+0000 is not published, and the run fails with `invalid_output` (its
    /// next step, or its end, reports it): inside a step it could not be memoized, and one rule
    /// for every chunk beats output that changes with where it was emitted.
    pub async fn emit(&self, chunk: impl Into<String>) {
        let chunk = chunk.into();
        {
            let mut in_flight = self.inner.in_flight.lock().unwrap();
            if chunk.contains('\0') {
                let message = match in_flight.as_ref() {
                    Some(step) => format!(
                        "{} emitted a chunk holding U+0000 (its chunk {}); {NUL_REFUSED}",
                        step.label,
                        step.chunks.len() + 1
                    ),
                    None => format!(
                        "the workflow emitted a chunk holding U+0000 between steps; {NUL_REFUSED}"
                    ),
                };
                drop(in_flight);
                self.refuse(message);
                return;
            }
            if let Some(step) = in_flight.as_mut() {
                step.chunks.push(chunk.clone());
            }
        }
        self.inner.emitted.fetch_add(1, Ordering::SeqCst);
        self.inner.chunks.emit(chunk).await;
    }

    /// Runs a step with the default [`RetryPolicy`]; see [`RunContext::step_with`].
    pub async fn step<T, F, Fut>(&self, name: &str, f: F) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(StepInfo) -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        self.step_with(name, RetryPolicy::default(), f).await
    }

    /// Runs the next step, or returns what an earlier attempt recorded for it.
    ///
    /// - memoized: the recorded output (or error) comes back and `f` does not run; a recorded
    ///   step with another name is [`WorkflowError::NonDeterminism`];
    /// - cancellation requested: [`WorkflowError::Cancelled`] before `f` runs;
    /// - otherwise `f` runs (retryable errors retried per `policy`) and its output or final
    ///   error is recorded, fenced by the claim epoch, before this returns.
    pub async fn step_with<T, F, Fut>(
        &self,
        name: &str,
        policy: RetryPolicy,
        mut f: F,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(StepInfo) -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let number = self.inner.step_counter.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(refused) = self.refusal() {
            return Err(refused);
        }
        if let Some(recorded) = self.inner.memo.get(&number) {
            if recorded.name == name {
                for chunk in &recorded.chunks {
                    self.inner.emitted.fetch_add(1, Ordering::SeqCst);
                    self.inner.chunks.emit(chunk.clone()).await;
                }
            }
            return replayed(recorded, number, name);
        }
        self.check_cancelled()?;

        let info = StepInfo {
            run_id: self.inner.identity.run_id.clone(),
            step: number,
            name: name.to_string(),
            attempt: self.inner.identity.attempt,
            claim_epoch: self.inner.identity.claim_epoch,
        };
        let started_at = Utc::now();
        let timer = std::time::Instant::now();
        let label = step_label(number, name);
        let mut retries = 0;
        let outcome = loop {
            let mark = self.inner.emitted.load(Ordering::SeqCst);
            *self.inner.in_flight.lock().unwrap() = Some(StepInFlight {
                label: label.clone(),
                chunks: Vec::new(),
            });
            match f(info.clone()).await {
                Ok(value) => break Ok(value),
                Err(StepError::Retryable(message)) if retries < policy.max_retries => {
                    tracing::debug!(run = %info.run_id, step = number, %message, "step will be retried");
                    if self.inner.emitted.load(Ordering::SeqCst) > mark {
                        // the failed try's chunks were published: the output restarts before them
                        self.inner.chunks.rewind(mark).await;
                        self.inner.emitted.store(mark, Ordering::SeqCst);
                    }
                    retries += 1;
                    tokio::time::sleep(policy.backoff(retries)).await;
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        crate::latency::STEP.observe(timer.elapsed());
        let chunks = self
            .inner
            .in_flight
            .lock()
            .unwrap()
            .take()
            .map(|step| step.chunks)
            .unwrap_or_default();
        if let Some(refused) = self.refusal() {
            // one of the step's chunks could not be stored: nor can the step
            return Err(refused);
        }
        match outcome {
            Ok(value) => {
                let json = serde_json::to_value(&value)
                    .map_err(|e| WorkflowError::Encode(e.to_string()))?;
                if let Some(path) = nul_path(&json) {
                    return Err(self.refuse(format!(
                        "{label} returned an output holding U+0000 at {path}; {NUL_REFUSED}"
                    )));
                }
                self.record(FinishedStep {
                    step: number,
                    name,
                    output: Some(&json),
                    error: None,
                    chunks: &chunks,
                    started_at,
                })
                .await?;
                Ok(value)
            }
            Err(message) => {
                let error = json!({"code": "step_failed", "message": message});
                if let Some(path) = nul_path(&error) {
                    return Err(self.refuse(format!(
                        "{label} failed with an error holding U+0000 at {path}; {NUL_REFUSED}"
                    )));
                }
                self.record(FinishedStep {
                    step: number,
                    name,
                    output: None,
                    error: Some(&error),
                    chunks: &chunks,
                    started_at,
                })
                .await?;
                Err(WorkflowError::StepFailed {
                    step: number,
                    name: name.to_string(),
                    message,
                })
            }
        }
    }

    /// Why this attempt must fail with `invalid_output`, once a value could not be stored.
    pub(crate) fn refusal(&self) -> Option<WorkflowError> {
        self.inner
            .refused
            .lock()
            .unwrap()
            .clone()
            .map(WorkflowError::InvalidOutput)
    }

    /// Marks the attempt as failed by a value that cannot be stored; the first reason stays.
    fn refuse(&self, message: String) -> WorkflowError {
        let mut refused = self.inner.refused.lock().unwrap();
        let first = refused.get_or_insert(message);
        tracing::warn!(run = %self.inner.identity.run_id, reason = %first, "run fails: a value cannot be stored");
        WorkflowError::InvalidOutput(first.clone())
    }

    /// Records a step through the executor's batched writes (which retry while the database is
    /// unreachable, and recognise a retried write that had committed as ours). A write the
    /// database refuses for what it holds fails the run: it would be refused on every attempt.
    async fn record(&self, step: FinishedStep<'_>) -> Result<(), WorkflowError> {
        let id = &self.inner.identity;
        let submitted = self
            .inner
            .steps
            .submit(StepWrite {
                run_id: id.run_id.clone(),
                claim_epoch: id.claim_epoch,
                step: step.step,
                name: step.name.to_string(),
                output: step.output.cloned(),
                error: step.error.cloned(),
                chunks: step.chunks.to_vec(),
                started_at: step.started_at,
            })
            .await;
        let recorded = match submitted {
            Ok(recorded) => recorded,
            Err(e) if e.is_value_refused() => {
                return Err(self.refuse(format!(
                    "the database refused to store {}: {e}",
                    step_label(step.step, step.name)
                )))
            }
            Err(e) => return Err(e.into()),
        };
        if recorded.cancel_requested {
            self.inner.cancel_requested.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn replayed<T: DeserializeOwned>(
    recorded: &StepRecord,
    number: i32,
    name: &str,
) -> Result<T, WorkflowError> {
    if recorded.name != name {
        return Err(WorkflowError::NonDeterminism {
            step: number,
            recorded: recorded.name.clone(),
            requested: name.to_string(),
        });
    }
    match (&recorded.output, &recorded.error) {
        (Some(output), _) => serde_json::from_value(output.clone()).map_err(|e| {
            WorkflowError::Encode(format!(
                "recorded output of step {number} ({name}) no longer decodes: {e}"
            ))
        }),
        (None, error) => Err(WorkflowError::StepFailed {
            step: number,
            name: name.to_string(),
            message: error
                .as_ref()
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("recorded error")
                .to_string(),
        }),
    }
}
