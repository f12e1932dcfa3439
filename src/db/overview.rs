//! SQL for the operator's overview (the web view and `GET /v1/counts`, `/v1/executors`,
//! `/v1/queues`): counts per status, executors and their leases, queue depth and the runs nobody
//! can execute. Each answer is one statement that builds its JSON in Postgres, so the shapes are
//! the views' own columns.

use serde_json::Value;

use super::{Conn, DbError};

/// Filters of a count; `None` matches everything.
#[derive(Debug, Default, Clone)]
pub struct CountFilter {
    pub workflow: Option<String>,
    pub queue: Option<String>,
    pub concurrency_key: Option<String>,
}

/// Runs per status (every status present, zero when none), for the runs matching `f`.
pub async fn status_counts(client: &impl Conn, f: &CountFilter) -> Result<Value, DbError> {
    let sql = "select json_object_agg(s.status, coalesce(c.n, 0))
                 from unnest(array['queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead']) s(status)
                 left join (select r.status, count(*) as n from spool.runs r
                             where ($1::text is null or r.workflow = $1)
                               and ($2::text is null or r.queue = $2)
                               and ($3::text is null or r.concurrency_key = $3)
                             group by r.status) c on c.status = s.status";
    one_value(client, sql, &[&f.workflow, &f.queue, &f.concurrency_key]).await
}

/// Every executor of `spool.executor_liveness`, live ones first, with its lease age in ms.
pub async fn executors(client: &impl Conn) -> Result<Value, DbError> {
    let sql = "select coalesce(json_agg(x order by x.alive desc, x.id), '[]') from (
                 select e.id, e.incarnation, e.alive, e.lock_held, e.running, e.workflows, e.queues,
                        e.heartbeat_at, e.lease_ms, e.lease_expires_at, e.takeover_at,
                        e.started_at, e.stopped_at,
                        (extract(epoch from e.since_heartbeat) * 1000)::int8 as heartbeat_age_ms
                   from spool.executor_liveness e) x";
    one_value(client, sql, &[]).await
}

/// Unfinished work per queue, the busiest concurrency keys (at most `max_keys`) and the runs
/// nobody can execute with the reason (at most `max_unrunnable`).
pub async fn queues(
    client: &impl Conn,
    max_keys: i64,
    max_unrunnable: i64,
) -> Result<Value, DbError> {
    let sql = "select json_build_object(
          'queues', (select coalesce(json_agg(q order by q.queue), '[]') from (
              select d.queue, sum(d.ready)::int8 as ready, sum(d.scheduled)::int8 as scheduled,
                     sum(d.running)::int8 as running,
                     (extract(epoch from now() - min(d.oldest_queued)) * 1000)::int8 as oldest_queued_age_ms
                from spool.queue_depth d group by d.queue) q),
          'keys', (select coalesce(json_agg(k order by k.oldest_queued_age_ms desc nulls last, k.queue, k.concurrency_key), '[]') from (
              select d.queue, d.concurrency_key, d.ready, d.scheduled, d.running,
                     (extract(epoch from now() - d.oldest_queued) * 1000)::int8 as oldest_queued_age_ms
                from spool.queue_depth d where d.concurrency_key is not null
               order by d.oldest_queued nulls last limit $1) k),
          'unrunnable', (select coalesce(json_agg(u order by u.created_at), '[]') from (
              select u.id, u.workflow, u.queue, u.status, u.executor_id, u.reason, u.created_at
                from spool.unrunnable_runs u order by u.created_at limit $2) u))";
    one_value(client, sql, &[&max_keys, &max_unrunnable]).await
}

async fn one_value(
    client: &impl Conn,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Value, DbError> {
    let stmt = client.stmt(sql).await.map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, params)
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}
