//! Built-in workflows: `noop` (throughput) and `ticker` (demos and fault tests).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Registry, RunContext, StepError, WorkflowError};

pub const NOOP: &str = "noop";
pub const TICKER: &str = "ticker";

pub(super) fn register(r: &mut Registry) {
    r.register(NOOP, |_ctx: RunContext, input: Value| async move {
        Ok::<_, WorkflowError>(input)
    });
    r.register(TICKER, ticker);
}

/// Input of `ticker`: emit `tick-1` … `tick-{count}`, one every `interval_ms`, spread over
/// `steps` memoized steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TickerInput {
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_steps")]
    pub steps: u32,
}

fn default_count() -> u32 {
    5
}
fn default_interval() -> u64 {
    200
}
fn default_steps() -> u32 {
    1
}

async fn ticker(ctx: RunContext, input: TickerInput) -> Result<Value, WorkflowError> {
    if input.count > 1_000_000 {
        return Err(WorkflowError::InvalidInput(
            "count must be at most 1000000".into(),
        ));
    }
    if input.interval_ms > 3_600_000 {
        return Err(WorkflowError::InvalidInput(
            "interval_ms must be at most 3600000".into(),
        ));
    }
    if input.steps == 0 || input.steps > input.count.max(1) {
        return Err(WorkflowError::InvalidInput(format!(
            "steps must be between 1 and count ({})",
            input.count.max(1)
        )));
    }
    let (count, steps) = (input.count, input.steps);
    for s in 0..steps {
        // step s emits ticks (first..=last); the remainder goes to the first steps
        let first = s * (count / steps) + s.min(count % steps) + 1;
        let last = first + count / steps + u32::from(s < count % steps) - 1;
        let name = format!("ticks-{first}-{last}");
        let ctx2 = ctx.clone();
        ctx.step(&name, move |_info| {
            let ctx = ctx2.clone();
            async move {
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
    Ok(json!({"ticks": count}))
}
