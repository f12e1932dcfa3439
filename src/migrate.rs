//! Applies the schema in `sql/` (refinery migrations embedded in the binary).
//!
//! - The migration history is `spool.refinery_schema_history`, inside Spool's own schema, so a
//!   role needs no rights on `public` (PostgreSQL 15 gives none by default). A history left in
//!   `public` by an older Spool is moved there on the first migration.
//! - Several processes may start at once: the migration runs on a dedicated connection that first
//!   takes a session advisory lock, so exactly one applies it and the others wait, then find
//!   nothing to do. The lock dies with the connection. A process waiting for it says who holds it
//!   (any role that can connect can take it) and gives up after a timeout instead of hanging.
//! - A database that is already current gets no DDL at all (a process whose role may only read and
//!   write rows starts fine); `spool serve --no-migrate` never migrates and waits for someone who
//!   may (`spool migrate` as the schema owner).

use std::time::Duration;

use tokio::time::Instant;

use crate::db::{self, DbError, PgTarget};

mod embedded {
    refinery::embed_migrations!("sql");
}

/// Advisory lock key that serializes migrations (an arbitrary constant: "spool-mg").
const MIGRATION_LOCK: i64 = 0x73706f6f6c2d6d67;
/// Where the migration history lives.
pub const HISTORY_TABLE: &str = "spool.refinery_schema_history";
/// How often a waiting process says again that it waits.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often a waiting process tries again.
const WAIT_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
    #[error("the migration lock is still held after {waited:?} by {holder}; end that session or raise SPOOL_MIGRATION_LOCK_TIMEOUT_MS")]
    LockTimeout { waited: Duration, holder: String },
    #[error("the database schema is at version {found}, this binary needs {needed}, and nobody migrated it within {waited:?}: run `spool migrate` as the schema owner (this process was started with --no-migrate)")]
    NotMigrated {
        found: i32,
        needed: i32,
        waited: Duration,
    },
}

/// Applies every pending migration; returns the versions applied by this call. Waits at most
/// `lock_timeout` for another process's migration.
pub async fn migrate(target: &PgTarget, lock_timeout: Duration) -> Result<Vec<i32>, MigrateError> {
    let mut conn = db::connect_dedicated(target, "spool-migrate", None).await?;
    take_lock(&conn.client, lock_timeout).await?;
    let report = async {
        conn.client
            .batch_execute(
                "create schema if not exists spool;
                 do $$ begin
                   if to_regclass('spool.refinery_schema_history') is null
                      and to_regclass('public.refinery_schema_history') is not null then
                     alter table public.refinery_schema_history set schema spool;
                   end if;
                 end $$;",
            )
            .await
            .map_err(DbError::from_pg)?;
        let mut runner = embedded::migrations::runner().set_grouped(true);
        runner.set_migration_table_name(HISTORY_TABLE);
        Ok::<_, MigrateError>(runner.run_async(&mut conn.client).await?)
    }
    .await;
    // Unlock explicitly; dropping the connection would release it too.
    let _ = conn
        .client
        .execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    Ok(report?
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// What `spool serve` does at start: nothing when the schema is current; otherwise migrate, or
/// with `no_migrate` wait (at most `timeout`) for someone else to.
pub async fn ensure_current(
    target: &PgTarget,
    no_migrate: bool,
    timeout: Duration,
) -> Result<Vec<i32>, MigrateError> {
    let conn = db::connect_dedicated(target, "spool-migrate", None).await?;
    if current_version(&conn.client).await? >= latest_version() {
        return Ok(Vec::new());
    }
    if !no_migrate {
        drop(conn);
        return migrate(target, timeout).await;
    }
    let started = Instant::now();
    let mut told = None::<Instant>;
    loop {
        let found = current_version(&conn.client).await?;
        if found >= latest_version() {
            return Ok(Vec::new());
        }
        if started.elapsed() >= timeout {
            return Err(MigrateError::NotMigrated {
                found,
                needed: latest_version(),
                waited: timeout,
            });
        }
        if told.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
            tracing::warn!(
                found,
                needed = latest_version(),
                "the schema is not current and --no-migrate is set: waiting for `spool migrate`"
            );
            told = Some(Instant::now());
        }
        tokio::time::sleep(WAIT_POLL).await; // poll: nothing notifies the end of a migration
    }
}

/// Takes the migration lock, saying who holds it while it waits, for at most `timeout`.
async fn take_lock(client: &tokio_postgres::Client, timeout: Duration) -> Result<(), MigrateError> {
    let started = Instant::now();
    let mut told = None::<Instant>;
    loop {
        let got: bool = client
            .query_one("select pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(DbError::from_pg)?
            .get(0);
        if got {
            return Ok(());
        }
        let holder = lock_holder(client).await?;
        if started.elapsed() >= timeout {
            return Err(MigrateError::LockTimeout {
                waited: timeout,
                holder,
            });
        }
        if told.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
            tracing::warn!(%holder, timeout = ?timeout, "waiting for the migration lock");
            told = Some(Instant::now());
        }
        tokio::time::sleep(WAIT_POLL).await; // poll: advisory locks have no wait with a deadline
    }
}

/// Who holds the migration lock: pid, role, application and client address.
async fn lock_holder(client: &tokio_postgres::Client) -> Result<String, DbError> {
    let row = client
        .query_opt(
            "select format('pid %s (role %s, application %L, from %s)', a.pid, a.usename,
                           a.application_name, coalesce(host(a.client_addr), 'local socket'))
               from pg_locks l join pg_stat_activity a on a.pid = l.pid
              where l.locktype = 'advisory' and l.granted and l.objsubid = 1
                and l.classid::int8 = ($1::int8 >> 32) and l.objid::int8 = ($1::int8 & 4294967295)
                and l.database = (select oid from pg_database where datname = current_database())
              limit 1",
            &[&MIGRATION_LOCK],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(row
        .map(|r| r.get(0))
        .unwrap_or_else(|| "a session that has just released it".to_string()))
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

/// The newest migration the database has (0 when none).
async fn current_version(client: &impl crate::db::Conn) -> Result<i32, DbError> {
    let stmt = client
        .stmt(&format!(
            "select coalesce(max(version), 0) from {HISTORY_TABLE}"
        ))
        .await;
    let stmt = match stmt {
        Ok(s) => s,
        // the history table (or the schema) does not exist yet
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME) =>
        {
            return Ok(0)
        }
        Err(e) => return Err(DbError::from_pg(e)),
    };
    let row = client
        .pg()
        .query_one(&stmt, &[])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}

/// True when the database has every migration this binary carries.
pub async fn is_current(client: &impl crate::db::Conn) -> Result<bool, DbError> {
    Ok(current_version(client).await? >= latest_version())
}
