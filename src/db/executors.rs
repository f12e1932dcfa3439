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
/// incarnation exists, which means this process has been superseded). Either renews the lease.
pub async fn register_incarnation(
    client: &Client,
    executor_id: &str,
    workflows: &[String],
    queues: Option<&[String]>,
    lease: &LeaseTerms,
    keep_incarnation: Option<i64>,
) -> Result<Option<i64>, DbError> {
    let row = match keep_incarnation {
        None => client
            .query_one(
                "insert into spool.executors as e
                        (id, workflows, queues, lock_pid, lease_ms, takeover_after_ms)
                 values ($1, $2, $3, pg_backend_pid(), $4, $5)
                 on conflict (id) do update
                    set incarnation = e.incarnation + 1, workflows = excluded.workflows,
                        queues = excluded.queues, lock_pid = excluded.lock_pid,
                        lease_ms = excluded.lease_ms,
                        takeover_after_ms = excluded.takeover_after_ms,
                        started_at = now(), heartbeat_at = now(), stopped_at = null
                 returning incarnation",
                &[
                    &executor_id,
                    &workflows,
                    &queues,
                    &lease.lease_ms,
                    &lease.takeover_after_ms,
                ],
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

/// An executor's lease settings, recorded in its row.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTerms {
    pub lease_ms: i32,
    /// 0: its runs are never adopted.
    pub takeover_after_ms: i32,
}

/// The backend holding `executor_id`'s lock, and whether that executor's lease has expired (or
/// it stopped). `None` when nobody holds the lock.
pub async fn lock_holder(
    client: &Client,
    executor_id: &str,
) -> Result<Option<(i32, bool)>, DbError> {
    let row = client
        .query_opt(
            "with k as (select hashtextextended('spool.executor:' || $1, 0) as key)
             select l.pid,
                    coalesce((select e.stopped_at is not null
                                  or e.heartbeat_at + make_interval(secs => e.lease_ms / 1000.0) < now()
                                from spool.executors e where e.id = $1), true)
               from pg_locks l, k
              where l.locktype = 'advisory' and l.granted and l.objsubid = 1
                and l.database = (select oid from pg_database where datname = current_database())
                and l.classid::int8 = (k.key >> 32) & 4294967295
                and l.objid::int8 = k.key & 4294967295
              limit 1",
            &[&executor_id],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The executor's last heartbeat (database time) and its lease, if it is registered.
pub async fn heartbeat_of(
    client: &impl super::Conn,
    executor_id: &str,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, std::time::Duration)>, DbError> {
    let stmt = client
        .stmt("select heartbeat_at, lease_ms from spool.executors where id = $1")
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_opt(&stmt, &[&executor_id])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.map(|r| {
        let lease_ms: i32 = r.get(1);
        (
            r.get(0),
            std::time::Duration::from_millis(lease_ms.max(0) as u64),
        )
    }))
}

/// Ends a stale session that still holds an executor lock (a dead host's, or this process's own
/// frozen one) and waits up to `wait_ms` for it to go. A role may terminate its own sessions.
pub async fn terminate_session(client: &Client, pid: i32, wait_ms: i64) -> Result<bool, DbError> {
    let row = client
        .query_one("select pg_terminate_backend($1, $2)", &[&pid, &wait_ms])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}

/// This connection's backend pid.
pub async fn backend_pid(client: &Client) -> Result<i32, DbError> {
    let row = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}

/// Renews the lease (database time). Returns false when this incarnation has been superseded or
/// stopped.
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
