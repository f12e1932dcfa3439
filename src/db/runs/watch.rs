//! Reads that follow runs for live attach: which attached runs have ended, and which run of a
//! concurrency key comes next.

use super::{Run, RUN_COLUMNS};
use crate::db::{Conn, DbError};

/// A run that has ended, as the end watcher of live attach sees it.
pub struct EndedRun {
    pub run: Run,
    /// The executor incarnation that ended the run is alive: if the run's end has not reached
    /// NATS yet, that executor is still trying to publish it.
    pub publisher_alive: bool,
}

/// The runs among `ids` that have ended (one statement, whatever the number of ids): how live
/// attach learns of ends that never reached NATS.
pub async fn ended_runs(client: &impl Conn, ids: &[String]) -> Result<Vec<EndedRun>, DbError> {
    let sql = format!(
        "select exists (
                  select 1 from spool.executors e
                   where e.id = r.executor_id and e.incarnation = r.incarnation
                     and e.stopped_at is null
                     and e.heartbeat_at > now() - make_interval(secs => e.lease_ms / 1000.0)),
                {RUN_COLUMNS}
           from spool.runs r
          where r.id = any($1) and r.status in ('succeeded', 'failed', 'cancelled', 'dead')"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(&stmt, &[&ids])
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows
        .iter()
        .map(|row| EndedRun {
            publisher_alive: row.get(0),
            run: Run::from_row_offset(row, 1),
        })
        .collect())
}

/// For following a concurrency key: the first run of (`queue`, `key`) enqueued after
/// `after_seq` that has started (running, or ended after starting), unless a run before it is
/// still waiting to start (`Ok(None)`: try again later). Runs that ended without starting
/// (cancelled or replaced while queued) are skipped.
pub async fn next_started_run_of_key(
    client: &impl Conn,
    queue: &str,
    key: &str,
    after_seq: i64,
) -> Result<Option<Run>, DbError> {
    let sql = format!(
        "select {RUN_COLUMNS} from spool.runs r
          where r.queue = $1 and r.concurrency_key = $2 and r.enqueue_seq > $3
            and not (r.status in ('succeeded', 'failed', 'cancelled', 'dead') and r.started_at is null)
          order by r.enqueue_seq
          limit 1"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_opt(&stmt, &[&queue, &key, &after_seq])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row
        .as_ref()
        .map(Run::from_row)
        .filter(|r| r.status != "queued"))
}

/// Where following a key starts: just before its running (or next queued) run, or after its
/// last run when it has no work.
pub async fn key_follow_start(client: &impl Conn, queue: &str, key: &str) -> Result<i64, DbError> {
    let stmt = client
        .stmt(
            "select coalesce(
                 (select min(enqueue_seq) - 1 from spool.runs
                   where queue = $1 and concurrency_key = $2 and status in ('queued', 'running')),
                 (select max(enqueue_seq) from spool.runs where queue = $1 and concurrency_key = $2),
                 0)",
        )
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, &[&queue, &key])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}

/// The run of `key` with this `enqueue_seq`, if it still exists.
pub async fn run_of_key_at(
    client: &impl Conn,
    queue: &str,
    key: &str,
    seq: i64,
) -> Result<Option<Run>, DbError> {
    let sql = format!(
        "select {RUN_COLUMNS} from spool.runs r
          where r.queue = $1 and r.concurrency_key = $2 and r.enqueue_seq = $3"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_opt(&stmt, &[&queue, &key, &seq])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.as_ref().map(Run::from_row))
}
