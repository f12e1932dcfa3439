//! A user's own Spool server: the `spool` command line with the built-in workflows plus
//! workflows of your own.
//!
//! `order` is a three-step workflow whose steps have a side effect: each execution appends a row
//! to `example_ledger` (created at start), keyed by the step's idempotency key. After a crash,
//! the ledger shows that finished steps were not executed again.
//!
//! `ledger_ticker` is `ticker` whose every step execution also appends a row to
//! `example_step_ledger` (run, key, step number, attempt, executor, time): the oracle of the fault
//! tests and of `just chaos`, written by the steps themselves, outside Spool's schema.
//!
//! `abort` kills the whole process on every attempt; it exists to show (and test) that such a
//! poison run ends `dead` after `max_attempts` instead of crash-looping forever.
//!
//! Run it like `spool`: `cargo run --example server -- serve`.

use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use spool::db::{self, PgTarget};
use spool::workflow::RetryPolicy;
use spool::{Registry, RunContext, StepError, StepInfo, WorkflowError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderInput {
    item: String,
    /// Pause inside each step, so there is time to kill the process mid-run.
    #[serde(default)]
    pause_ms: u64,
}

#[derive(Debug, Serialize)]
struct OrderOutput {
    item: String,
    reservation: String,
    charge: String,
    tracking: String,
}

#[derive(Clone)]
struct Ledger {
    pool: deadpool_postgres::Pool,
}

impl Ledger {
    async fn record(&self, step: &StepInfo, pause_ms: u64) -> Result<String, StepError> {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        client
            .execute(
                "insert into example_ledger (run_id, step, idempotency_key) values ($1, $2, $3)",
                &[&step.run_id, &step.name, &step.idempotency_key()],
            )
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
        Ok(format!("{}-{}", step.name, step.idempotency_key()))
    }
}

async fn order(
    ctx: RunContext,
    input: OrderInput,
    ledger: Ledger,
) -> Result<OrderOutput, WorkflowError> {
    let pause = input.pause_ms;
    let reservation = ctx
        .step("reserve", |s| {
            let l = ledger.clone();
            async move { l.record(&s, pause).await }
        })
        .await?;
    let charge = ctx
        .step("charge", |s| {
            let l = ledger.clone();
            async move { l.record(&s, pause).await }
        })
        .await?;
    let tracking = ctx
        .step("ship", |s| {
            let l = ledger.clone();
            async move { l.record(&s, pause).await }
        })
        .await?;
    Ok(OrderOutput {
        item: input.item,
        reservation,
        charge,
        tracking,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerTickerInput {
    #[serde(default = "five")]
    count: u32,
    #[serde(default)]
    interval_ms: u64,
    #[serde(default = "one")]
    steps: u32,
    /// Copied into the ledger so per-key order can be checked.
    #[serde(default)]
    key: Option<String>,
}

fn five() -> u32 {
    5
}
fn one() -> u32 {
    1
}

async fn ledger_ticker(
    ctx: RunContext,
    input: LedgerTickerInput,
    ledger: Ledger,
) -> Result<Value, WorkflowError> {
    let executor = std::env::var("SPOOL_EXECUTOR_ID").unwrap_or_default();
    let steps = input.steps.clamp(1, input.count.max(1));
    let per = input.count.div_ceil(steps);
    for s in 0..steps {
        let first = s * per + 1;
        let last = ((s + 1) * per).min(input.count);
        let (ledger, key, executor, ctx2) = (
            ledger.clone(),
            input.key.clone(),
            executor.clone(),
            ctx.clone(),
        );
        // patient retries: the ledger write must survive a database restart
        let patient = RetryPolicy {
            max_retries: 60,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        };
        ctx.step_with(&format!("ticks-{first}-{last}"), patient, move |step| {
            let (ledger, key, executor, ctx) = (ledger.clone(), key.clone(), executor.clone(), ctx2.clone());
            async move {
                let client = ledger.pool.get().await.map_err(|e| StepError::retryable(e.to_string()))?;
                client
                    .execute(
                        "insert into example_step_ledger (run_id, key, step, attempt, executor) values ($1, $2, $3, $4, $5)",
                        &[&step.run_id, &key, &step.step, &step.attempt, &executor],
                    )
                    .await
                    .map_err(|e| StepError::retryable(e.to_string()))?;
                drop(client);
                for tick in first..=last {
                    if tick > 1 && input.interval_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(input.interval_ms)).await;
                    }
                    ctx.emit(format!("tick-{tick}")).await;
                }
                Ok::<_, StepError>(last)
            }
        })
        .await?;
    }
    Ok(serde_json::json!({"ticks": input.count}))
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut registry = Registry::with_builtins();
    registry.register("abort", |_ctx: RunContext, _input: Value| async move {
        eprintln!("abort workflow: aborting the process");
        std::process::abort();
        #[allow(unreachable_code)]
        Ok::<Value, WorkflowError>(Value::Null)
    });
    if let Ok(url) = std::env::var("DATABASE_URL") {
        match PgTarget::parse(&url) {
            Ok(target) => {
                let pool = db::pool(&target, 4, "spool-example-ledger");
                if let Ok(client) = pool.get().await {
                    let _ = client
                        .batch_execute(
                            "create table if not exists example_ledger (
                                 id bigserial primary key,
                                 run_id text not null,
                                 step text not null,
                                 idempotency_key text not null,
                                 executed_at timestamptz not null default clock_timestamp());
                             create table if not exists example_step_ledger (
                                 id bigserial primary key,
                                 run_id text not null,
                                 key text,
                                 step int not null,
                                 attempt int not null,
                                 executor text not null,
                                 executed_at timestamptz not null default clock_timestamp())",
                        )
                        .await;
                }
                let ledger = Ledger { pool };
                let l2 = ledger.clone();
                registry.register("order", move |ctx: RunContext, input: OrderInput| {
                    order(ctx, input, ledger.clone())
                });
                registry.register(
                    "ledger_ticker",
                    move |ctx: RunContext, input: LedgerTickerInput| {
                        ledger_ticker(ctx, input, l2.clone())
                    },
                );
            }
            Err(e) => eprintln!("example server: bad DATABASE_URL: {e}"),
        }
    }
    spool::cli::main_with(registry).await
}
