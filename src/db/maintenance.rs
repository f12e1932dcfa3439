//! SQL for periodic maintenance: the leases that make one executor at a time do it, and the
//! retention window (`spool.purge_finished_window`).

use std::time::Duration;

use super::{Conn, DbError};

/// Takes or renews the maintenance lease `name` for `holder` for `ttl`; true when `holder` holds
/// it afterwards. An expired lease is anyone's.
pub async fn try_lease(
    client: &impl Conn,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool, DbError> {
    let stmt = client
        .stmt(
            "insert into spool.maintenance_leases as l (name, holder, expires_at)
             values ($1, $2, now() + make_interval(secs => $3::float8))
             on conflict (name) do update
                set holder = excluded.holder, expires_at = excluded.expires_at
              where l.expires_at < now() or l.holder = excluded.holder
             returning holder",
        )
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_opt(&stmt, &[&name, &holder, &ttl.as_secs_f64()])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.is_some())
}

/// One retention window (`spool.purge_finished_window`): the expired runs among the `window`
/// runs after `after_seq` in enqueue order are deleted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub purged: i32,
    /// The last enqueue_seq looked at; `None` past the end of the table.
    pub last_seq: Option<i64>,
    /// How long ago the last run looked at was created, in seconds.
    pub last_age: Option<f64>,
}

pub async fn purge_finished_window(
    client: &impl Conn,
    retention: Duration,
    after_seq: i64,
    window: i32,
) -> Result<Window, DbError> {
    let stmt = client
        .stmt(
            "select w.purged, w.last_seq, extract(epoch from now() - w.last_created_at)::float8
               from spool.purge_finished_window(make_interval(secs => $1::float8), $2, $3) w",
        )
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, &[&retention.as_secs_f64(), &after_seq, &window])
        .await
        .map_err(DbError::from_pg)?;
    Ok(Window {
        purged: row.get(0),
        last_seq: row.get(1),
        last_age: row.get(2),
    })
}

/// The shortest retention of any queue (`retention` or a shorter `spool.queue_retention` row).
pub async fn shortest_retention(
    client: &impl Conn,
    retention: Duration,
) -> Result<Duration, DbError> {
    let stmt = client
        .stmt(
            "select least($1::float8, coalesce((select min(extract(epoch from q.retention))::float8
                                                  from spool.queue_retention q), $1::float8))",
        )
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, &[&retention.as_secs_f64()])
        .await
        .map_err(DbError::from_pg)?;
    Ok(Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0)))
}

/// Whether any run is executing anywhere (the partial index of running runs answers it).
pub async fn any_running(client: &impl Conn) -> Result<bool, DbError> {
    let stmt = client
        .stmt("select exists (select 1 from spool.runs where status = 'running')")
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, &[])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}
