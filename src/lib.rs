//! Spool: a durable run queue that needs only PostgreSQL to be correct.
//!
//! A *run* (a workflow name plus JSON input) is enqueued with a plain SQL `INSERT` into
//! `spool.runs` or over HTTP, claimed by an executor with `FOR UPDATE SKIP LOCKED`, and executed
//! step by step; each step's output is memoized in `spool.operation_outputs`, so a restarted
//! executor replays its runs and skips finished steps.
//!
//! # Layout
//! - [`config`]: one validated [`config::Config`] from flags and environment.
//! - [`db`]: every SQL statement, one module per table; TLS-aware connections.
//! - [`migrate`]: the embedded schema in `sql/`, applied under an advisory lock.
//! - [`workflow`]: the library API — [`workflow::Registry`], [`workflow::RunContext::step`],
//!   built-in `noop` and `ticker`.
//! - [`executor`]: executor identity, the claim loop, recovery, shutdown.
//! - [`live`]: live output — the JetStream chunk publisher and the attach protocol.
//! - [`api`]: the HTTP API, including the SSE attach endpoint.
//! - [`ui`]: the web view (embedded assets) and its session cookie.
//! - [`serve`]: wires the above into `spool serve`.
//! - [`cli`]: the `spool` command line; [`sse_client`]: the attach client it uses.

pub mod api;
pub mod cli;
mod cli_attach;
pub mod config;
pub mod db;
pub mod executor;
pub mod latency;
pub mod live;
pub mod llm;
pub mod migrate;
pub mod serve;
pub mod sse_client;
pub mod ui;
pub mod validate;
pub mod workflow;

pub use workflow::{Registry, RunContext, StepError, StepInfo, WorkflowError};
