//! SQL for the database's metrics (`/metrics` of the executor holding the `metrics` lease): the
//! queues' depth and oldest ready age, runs nobody can execute, executors and their leases. Each
//! query reads only unfinished runs (through the partial indexes that hold them) or the executors
//! table; how runs end is counted by each process (`spool_runs_*_total`). The executor runs them
//! in one repeatable-read transaction, so every family describes the same moment.

use super::{Conn, DbError};

/// Unfinished work of one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDepth {
    pub queue: String,
    pub ready: i64,
    pub scheduled: i64,
    pub running: i64,
    /// Seconds since the oldest ready run became ready (its `run_at`); 0 when none is ready.
    pub oldest_ready_age: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorState {
    pub id: String,
    pub alive: bool,
    /// Seconds since its last lease renewal.
    pub heartbeat_age: f64,
    pub running: i64,
}

#[derive(Debug, Clone, Default)]
pub struct DbStats {
    pub queues: Vec<QueueDepth>,
    /// (queue, runs) that no live executor can execute.
    pub unrunnable: Vec<(String, i64)>,
    /// Executors not stopped, or stopped within the last hour.
    pub executors: Vec<ExecutorState>,
}

pub async fn collect(client: &impl Conn) -> Result<DbStats, DbError> {
    let pg = client.pg();
    let q = |sql: &'static str| async move {
        let stmt = client.stmt(sql).await.map_err(DbError::from_pg)?;
        pg.query(&stmt, &[]).await.map_err(DbError::from_pg)
    };
    let queues = q("select queue,
                count(*) filter (where status = 'queued' and run_at <= now()),
                count(*) filter (where status = 'queued' and run_at > now()),
                count(*) filter (where status = 'running'),
                coalesce(extract(epoch from now() - min(run_at) filter (where status = 'queued' and run_at <= now())), 0)::float8
           from spool.runs where status in ('queued', 'running')
          group by queue order by queue")
    .await?
    .iter()
    .map(|r| QueueDepth {
        queue: r.get(0),
        ready: r.get(1),
        scheduled: r.get(2),
        running: r.get(3),
        oldest_ready_age: r.get(4),
    })
    .collect();
    let unrunnable = q("select queue, count(*) from spool.unrunnable_runs group by 1 order by 1")
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let executors = q(
        "select id, alive, extract(epoch from since_heartbeat)::float8, running
           from spool.executor_liveness
          where stopped_at is null or stopped_at > now() - interval '1 hour' order by id",
    )
    .await?
    .iter()
    .map(|r| ExecutorState {
        id: r.get(0),
        alive: r.get(1),
        heartbeat_age: r.get(2),
        running: r.get(3),
    })
    .collect();
    Ok(DbStats {
        queues,
        unrunnable,
        executors,
    })
}
