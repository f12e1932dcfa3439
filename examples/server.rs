//! A user's own Spool server: the `spool` command line with the built-in workflows plus
//! workflows of your own.
//!
//! `order` is a three-step workflow whose steps have a side effect: each execution appends a row
//! to `example_ledger` (created at start), keyed by the step's idempotency key. After a crash,
//! the ledger shows that finished steps were not executed again.
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
                                 executed_at timestamptz not null default clock_timestamp())",
                        )
                        .await;
                }
                let ledger = Ledger { pool };
                registry.register("order", move |ctx: RunContext, input: OrderInput| {
                    order(ctx, input, ledger.clone())
                });
            }
            Err(e) => eprintln!("example server: bad DATABASE_URL: {e}"),
        }
    }
    spool::cli::main_with(registry).await
}
