//! The workflow API: register Rust workflows by name; each gets a [`RunContext`] whose
//! [`RunContext::step`] memoizes outputs in `spool.operation_outputs`.
//!
//! This module owns the rules of replay (a memoized step returns its recorded output or error
//! without running; a different name at the same number is a non-determinism error). It never
//! touches a run's status: the executor does that with the result a workflow returns.

mod builtin;
mod context;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

pub use builtin::{TickerInput, NOOP, TICKER};
pub use context::{
    ChunkSink, DiscardChunks, RetryPolicy, RunContext, RunEnd, RunIdentity, StepInfo,
};

use crate::db::DbError;

/// A step's failure, as the step's closure reports it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    /// Worth trying again (a timeout, a 503): retried with backoff up to the step's retry policy.
    #[error("{0}")]
    Retryable(String),
    /// Trying again cannot help: recorded as the step's error, and the run fails.
    #[error("{0}")]
    Fatal(String),
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable(message.into())
    }
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal(message.into())
    }
}

/// Why a workflow stopped without an output.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("step {step} ({name}) failed: {message}")]
    StepFailed {
        step: i32,
        name: String,
        message: String,
    },
    #[error("non-determinism at step {step}: the run recorded step {recorded:?} but the workflow now asks for {requested:?}")]
    NonDeterminism {
        step: i32,
        recorded: String,
        requested: String,
    },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    /// Cancelled while a step ran, which kept what it had produced so far (a partial reply).
    #[error("cancelled")]
    CancelledWith(Value),
    /// The claim was superseded (re-claimed, released or finished elsewhere): stop quietly.
    #[error("lost ownership of the run")]
    Lost,
    /// The database could not be reached to record progress; the run stays owned and is
    /// recovered later.
    #[error("database unavailable: {0}")]
    Database(DbError),
    #[error("cannot encode step output: {0}")]
    Encode(String),
    /// A step's output, error or chunk, or the run's own output or error, holds a value
    /// PostgreSQL cannot store (U+0000), or the database refused to store it. The run fails;
    /// trying again would produce the same value.
    #[error("{0}")]
    InvalidOutput(String),
}

impl WorkflowError {
    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed(message.into())
    }

    /// The `error` column value for a run that ended with this error.
    pub fn to_json(&self) -> Value {
        let code = match self {
            Self::StepFailed { .. } => "step_failed",
            Self::NonDeterminism { .. } => "non_determinism",
            Self::InvalidInput(_) => "invalid_input",
            Self::Failed(_) => "workflow_failed",
            Self::Cancelled | Self::CancelledWith(_) => "cancelled",
            Self::Lost => "lost",
            Self::Database(_) => "database_unavailable",
            Self::Encode(_) => "encode_failed",
            Self::InvalidOutput(_) => "invalid_output",
        };
        json!({"code": code, "message": self.to_string()})
    }
}

impl From<DbError> for WorkflowError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Lost(_) => WorkflowError::Lost,
            other => WorkflowError::Database(other),
        }
    }
}

/// Why a value holding U+0000 is refused, for the end of an `invalid_output` message.
pub(crate) const NUL_REFUSED: &str = "PostgreSQL cannot store U+0000 (NUL) in jsonb or text";

/// Where `value` holds U+0000, in a string or an object key at any depth, as a path such as
/// `$["items"][2]` (`$` is the value itself); `None` when PostgreSQL can store it. One walk.
pub(crate) fn nul_path(value: &Value) -> Option<String> {
    enum Segment<'v> {
        Key(&'v str),
        Index(usize),
    }
    /// True when `value` holds U+0000; `path` then leads to it (and is left as it was otherwise).
    fn walk<'v>(value: &'v Value, path: &mut Vec<Segment<'v>>) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Segment::Index(i));
                    if walk(item, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            Value::Object(map) => {
                for (key, item) in map {
                    path.push(Segment::Key(key));
                    if key.contains('\0') || walk(item, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => false,
        }
    }
    let mut path = Vec::new();
    walk(value, &mut path).then(|| {
        let mut rendered = String::from("$");
        for segment in path {
            match segment {
                Segment::Key(key) => rendered.push_str(&format!("[{key:?}]")),
                Segment::Index(i) => rendered.push_str(&format!("[{i}]")),
            }
        }
        rendered
    })
}

/// A registered workflow: takes the run's context and raw JSON input.
pub type WorkflowFn = Arc<
    dyn Fn(RunContext, Value) -> BoxFuture<'static, Result<Value, WorkflowError>> + Send + Sync,
>;

/// Workflows by name. Cheap to clone (the map is shared; registering copies it if shared): the
/// HTTP API clones it with its state for every request.
#[derive(Clone, Default)]
pub struct Registry {
    workflows: std::sync::Arc<BTreeMap<String, WorkflowFn>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in `noop` and `ticker`.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        builtin::register(&mut r);
        r
    }

    /// Registers `f` under `name`. The input is decoded into `I` first; input that does not
    /// decode fails the run with `invalid_input` without running anything.
    pub fn register<I, O, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(RunContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let wrapped: WorkflowFn = Arc::new(move |ctx, input| {
            let f = f.clone();
            Box::pin(async move {
                let input: I = serde_json::from_value(input)
                    .map_err(|e| WorkflowError::InvalidInput(e.to_string()))?;
                let output = f(ctx, input).await?;
                serde_json::to_value(output).map_err(|e| WorkflowError::Encode(e.to_string()))
            })
        });
        std::sync::Arc::make_mut(&mut self.workflows).insert(name.to_string(), wrapped);
        self
    }

    pub fn get(&self, name: &str) -> Option<&WorkflowFn> {
        self.workflows.get(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.workflows.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::nul_path;

    #[test]
    fn nul_is_found_in_any_string_or_key_at_any_depth() {
        assert_eq!(nul_path(&json!("a\u{0}b")).as_deref(), Some("$"));
        assert_eq!(
            nul_path(&json!({"a": [1, "x", {"b": "\u{0}"}]})).as_deref(),
            Some(r#"$["a"][2]["b"]"#)
        );
        assert_eq!(
            nul_path(&json!([{"ok": 1}, {"k\u{0}": null}])).as_deref(),
            Some(r#"$[1]["k\0"]"#)
        );
    }

    #[test]
    fn values_postgres_can_store_pass() {
        assert_eq!(nul_path(&json!(null)), None);
        assert_eq!(
            nul_path(&json!({"a": [1, "x", {"b": "\\u0000 spelled out", "c": true}]})),
            None
        );
    }
}
