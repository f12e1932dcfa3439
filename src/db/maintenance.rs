//! SQL for periodic maintenance: the leases that make one executor at a time do it, and the
//! retention batch (`spool.purge_finished_batch`).

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

/// Deletes at most `max_runs` runs finished longer ago than their queue's retention (or
/// `retention`); returns how many.
pub async fn purge_finished_batch(
    client: &impl Conn,
    retention: Duration,
    max_runs: i32,
) -> Result<i32, DbError> {
    let stmt = client
        .stmt("select spool.purge_finished_batch(make_interval(secs => $1::float8), $2)")
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, &[&retention.as_secs_f64(), &max_runs])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
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
