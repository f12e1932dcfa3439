//! Applies the schema in `sql/` (refinery migrations embedded in the binary).
//!
//! Several executors may start at once: the migration runs on a dedicated connection that first
//! takes a session advisory lock, so exactly one applies it and the others wait, then find
//! nothing to do. The lock dies with the connection.

use crate::db::{self, DbError, PgTarget};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Advisory lock key that serializes migrations (an arbitrary constant: "spool-mg").
const MIGRATION_LOCK: i64 = 0x73706f6f6c2d6d67;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
}

/// Applies every pending migration; returns the versions applied by this call.
pub async fn migrate(target: &PgTarget) -> Result<Vec<i32>, MigrateError> {
    let mut conn = db::connect_dedicated(target, "spool-migrate", None).await?;
    conn.client
        .execute("select pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(DbError::from_pg)?;
    let report = embedded::migrations::runner()
        .set_grouped(true)
        .run_async(&mut conn.client)
        .await;
    // Unlock explicitly; dropping the connection would release it too.
    let _ = conn
        .client
        .execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    let report = report?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The newest migration version this binary carries.
pub fn latest_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// True when the database has every migration this binary carries.
pub async fn is_current(client: &impl crate::db::Conn) -> Result<bool, DbError> {
    let stmt = client
        .stmt(
            "select coalesce(max(version), 0) from refinery_schema_history
              where to_regclass('refinery_schema_history') is not null",
        )
        .await;
    let stmt = match stmt {
        Ok(s) => s,
        // the history table does not exist yet
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Ok(false)
        }
        Err(e) => return Err(DbError::from_pg(e)),
    };
    let row = client
        .pg()
        .query_one(&stmt, &[])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get::<_, i32>(0) >= latest_version())
}
