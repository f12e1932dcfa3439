//! SQL for `spool.executors`: one row per executor id, a new incarnation per boot.
//!
//! These statements run on the executor's dedicated lock connection, never on a pooled one, so
//! `pg_backend_pid()` names the connection whose death means the executor is gone.

use tokio_postgres::Client;

use super::DbError;

/// Takes the executor id's session advisory lock on this (dedicated) connection.
/// Returns false when another live session holds it.
pub async fn try_lock_executor_id(client: &Client, executor_id: &str) -> Result<bool, DbError> {
    let row = client
        .query_one(
            "select pg_try_advisory_lock(hashtextextended('spool.executor:' || $1, 0))",
            &[&executor_id],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}

/// Registers a new incarnation of `executor_id`, or, with `keep_incarnation`, re-registers the
/// lock connection of the current one after a reconnect (returning `None` when a newer
/// incarnation exists, which means this process has been superseded).
pub async fn register_incarnation(
    client: &Client,
    executor_id: &str,
    workflows: &[String],
    queues: Option<&[String]>,
    keep_incarnation: Option<i64>,
) -> Result<Option<i64>, DbError> {
    let row = match keep_incarnation {
        None => client
            .query_one(
                "insert into spool.executors as e (id, workflows, queues, lock_pid)
                 values ($1, $2, $3, pg_backend_pid())
                 on conflict (id) do update
                    set incarnation = e.incarnation + 1, workflows = excluded.workflows,
                        queues = excluded.queues, lock_pid = excluded.lock_pid,
                        started_at = now(), heartbeat_at = now(), stopped_at = null
                 returning incarnation",
                &[&executor_id, &workflows, &queues],
            )
            .await
            .map_err(DbError::from_pg)
            .map(Some)?,
        Some(incarnation) => client
            .query_opt(
                "update spool.executors
                    set lock_pid = pg_backend_pid(), heartbeat_at = now()
                  where id = $1 and incarnation = $2 and stopped_at is null
                 returning incarnation",
                &[&executor_id, &incarnation],
            )
            .await
            .map_err(DbError::from_pg)?,
    };
    Ok(row.map(|r| r.get(0)))
}

/// Heartbeat for people watching `spool.executor_liveness`; liveness itself is the lock.
/// Returns false when this incarnation has been superseded.
pub async fn heartbeat(
    client: &Client,
    executor_id: &str,
    incarnation: i64,
) -> Result<bool, DbError> {
    let n = client
        .execute(
            "update spool.executors set heartbeat_at = now()
              where id = $1 and incarnation = $2 and stopped_at is null",
            &[&executor_id, &incarnation],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(n == 1)
}

/// Names the runs this incarnation is starting in isolation (empty: none); if the process dies
/// now, only these are blamed (see `runs::reclaim_owned`).
pub async fn set_probation(
    client: &Client,
    executor_id: &str,
    incarnation: i64,
    runs: &[String],
) -> Result<(), DbError> {
    client
        .execute(
            "update spool.executors set probation_runs = $3, probation_incarnation = $2
              where id = $1 and incarnation = $2",
            &[&executor_id, &incarnation, &runs],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(())
}

/// Marks the incarnation stopped (clean shutdown).
pub async fn mark_stopped(
    client: &Client,
    executor_id: &str,
    incarnation: i64,
) -> Result<(), DbError> {
    client
        .execute(
            "update spool.executors set stopped_at = now()
              where id = $1 and incarnation = $2",
            &[&executor_id, &incarnation],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(())
}

/// Workflows some live executor can run (for the HTTP API's unknown-workflow answer).
pub async fn live_workflows(client: &impl super::Conn) -> Result<Vec<String>, DbError> {
    let stmt = client
        .stmt(
            "select distinct unnest(workflows) from spool.executor_liveness where alive order by 1",
        )
        .await
        .map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(&stmt, &[])
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
