//! [`RunContext`]: what a workflow sees of its run while it executes — memoized steps, chunk
//! emission, cancellation and the idempotency key of the step in flight.
//!
//! Steps of one run execute one after another; their numbers come from the order in which the
//! workflow asks for them, which is why replay must ask in the same order.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::{StepError, WorkflowError};
use crate::db::{self, steps::StepRecord, DbError};

/// Which attempt of which run a context belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdentity {
    pub run_id: String,
    pub claim_epoch: i64,
    pub attempt: i32,
}

/// Where a run's chunks go. One sink per run attempt; the live-output publisher implements it.
pub trait ChunkSink: Send + Sync {
    /// Emits one chunk of the run's live output, in order.
    fn emit(&self, chunk: Bytes) -> BoxFuture<'_, Result<(), WorkflowError>>;
}

/// A sink that drops every chunk (no live output configured).
#[derive(Debug, Default)]
pub struct DiscardChunks;

impl ChunkSink for DiscardChunks {
    fn emit(&self, _chunk: Bytes) -> BoxFuture<'_, Result<(), WorkflowError>> {
        Box::pin(async { Ok(()) })
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
    /// The run's attempt (claim count); a step re-executed after a crash sees a higher one.
    pub attempt: i32,
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
    pool: Pool,
    /// Steps recorded by earlier attempts, by number.
    memo: BTreeMap<i32, StepRecord>,
    /// Number of the last step asked for.
    step_counter: AtomicI32,
    /// Set from the run row whenever a step is recorded.
    cancel_requested: AtomicBool,
    chunks: Arc<dyn ChunkSink>,
    /// How long a step write keeps retrying while the database is unreachable.
    db_patience: Duration,
}

impl RunContext {
    pub fn new(
        identity: RunIdentity,
        pool: Pool,
        memo: Vec<StepRecord>,
        cancel_requested: bool,
        chunks: Arc<dyn ChunkSink>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                identity,
                pool,
                memo: memo.into_iter().map(|s| (s.step, s)).collect(),
                step_counter: AtomicI32::new(0),
                cancel_requested: AtomicBool::new(cancel_requested),
                chunks,
                db_patience: Duration::from_secs(120),
            }),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.inner.identity.run_id
    }

    pub fn identity(&self) -> &RunIdentity {
        &self.inner.identity
    }

    /// True once someone asked to cancel the run (seen at the last step boundary).
    pub fn is_cancel_requested(&self) -> bool {
        self.inner.cancel_requested.load(Ordering::Relaxed)
    }

    /// Returns `Err(Cancelled)` when cancellation was requested; call it in long loops.
    pub fn check_cancelled(&self) -> Result<(), WorkflowError> {
        if self.is_cancel_requested() {
            Err(WorkflowError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Emits a chunk of live output.
    pub async fn emit(&self, chunk: impl Into<Bytes>) -> Result<(), WorkflowError> {
        self.inner.chunks.emit(chunk.into()).await
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
        if let Some(recorded) = self.inner.memo.get(&number) {
            return replayed(recorded, number, name);
        }
        self.check_cancelled()?;

        let info = StepInfo {
            run_id: self.inner.identity.run_id.clone(),
            step: number,
            name: name.to_string(),
            attempt: self.inner.identity.attempt,
        };
        let started_at = Utc::now();
        let mut retries = 0;
        let outcome = loop {
            match f(info.clone()).await {
                Ok(value) => break Ok(value),
                Err(StepError::Retryable(message)) if retries < policy.max_retries => {
                    tracing::debug!(run = %info.run_id, step = number, %message, "step will be retried");
                    retries += 1;
                    tokio::time::sleep(policy.backoff(retries)).await;
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        match outcome {
            Ok(value) => {
                let json = serde_json::to_value(&value)
                    .map_err(|e| WorkflowError::Encode(e.to_string()))?;
                self.record(number, name, Some(&json), None, started_at)
                    .await?;
                Ok(value)
            }
            Err(message) => {
                let error = json!({"code": "step_failed", "message": message});
                self.record(number, name, None, Some(&error), started_at)
                    .await?;
                Err(WorkflowError::StepFailed {
                    step: number,
                    name: name.to_string(),
                    message,
                })
            }
        }
    }

    /// Records a step, retrying while the database is unreachable (a write that committed but
    /// whose reply was lost is recognised on retry as ours).
    async fn record(
        &self,
        number: i32,
        name: &str,
        output: Option<&Value>,
        error: Option<&Value>,
        started_at: chrono::DateTime<Utc>,
    ) -> Result<(), WorkflowError> {
        let id = &self.inner.identity;
        let recorded = with_db_patience(self.inner.db_patience, || async {
            let client = self.inner.pool.get().await?;
            db::steps::record_step_if_owned(
                &client,
                &id.run_id,
                id.claim_epoch,
                number,
                name,
                output,
                error,
                started_at,
            )
            .await
        })
        .await?;
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

/// Retries `op` while its error is about connectivity, with backoff, for up to `patience`.
pub(crate) async fn with_db_patience<T, F, Fut>(patience: Duration, mut op: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(50);
    loop {
        match op().await {
            Err(e) if e.is_connectivity() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}
