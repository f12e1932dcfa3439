//! The executor's identity: a session advisory lock on the executor id, held on a dedicated
//! connection that dies with the process, plus the incarnation registered under that lock.
//!
//! Architecture invariant: the lock is never taken on a pooled connection (a pooled session lock
//! leaks to whoever gets the connection next), and the connection is made from the same
//! [`PgTarget`] as every other, so it honours `sslmode`.

use crate::db::{self, executors, DbError, DedicatedConnection, PgTarget};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("executor id {0:?} is held by another live process; stop it first, or give this process its own SPOOL_EXECUTOR_ID")]
    InUse(String),
    #[error("executor id {0:?} was taken over by a newer process while this one was disconnected; stopping")]
    Superseded(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A held executor id. Dropping it closes the lock connection and releases the id.
pub struct ExecutorLock {
    pub executor_id: String,
    pub incarnation: i64,
    conn: DedicatedConnection,
}

impl ExecutorLock {
    /// Takes the id and registers a new incarnation, or fails with [`IdentityError::InUse`].
    pub async fn acquire(
        target: &PgTarget,
        executor_id: &str,
        workflows: &[String],
        queues: Option<&[String]>,
    ) -> Result<Self, IdentityError> {
        let conn = lock_connection(target, executor_id).await?;
        let incarnation =
            executors::register_incarnation(&conn.client, executor_id, workflows, queues, None)
                .await?
                .expect("a fresh registration always returns an incarnation");
        Ok(Self {
            executor_id: executor_id.to_string(),
            incarnation,
            conn,
        })
    }

    /// Resolves when the lock connection has closed (the database restarted, the backend was
    /// terminated): the id is no longer held.
    pub async fn lost(&mut self) {
        let _ = (&mut self.conn.driver).await;
    }

    /// After [`ExecutorLock::lost`]: takes the id again and checks that no newer incarnation
    /// started meanwhile.
    pub async fn reacquire(
        &mut self,
        target: &PgTarget,
        workflows: &[String],
        queues: Option<&[String]>,
    ) -> Result<(), IdentityError> {
        let conn = match lock_connection(target, &self.executor_id).await {
            // someone else holds the id now: this process was taken over
            Err(IdentityError::InUse(id)) => return Err(IdentityError::Superseded(id)),
            other => other?,
        };
        let kept = executors::register_incarnation(
            &conn.client,
            &self.executor_id,
            workflows,
            queues,
            Some(self.incarnation),
        )
        .await?;
        if kept.is_none() {
            return Err(IdentityError::Superseded(self.executor_id.clone()));
        }
        self.conn = conn;
        Ok(())
    }

    pub async fn heartbeat(&self) -> Result<bool, DbError> {
        executors::heartbeat(&self.conn.client, &self.executor_id, self.incarnation).await
    }

    pub async fn set_probation(&self, runs: &[String]) -> Result<(), DbError> {
        executors::set_probation(&self.conn.client, &self.executor_id, self.incarnation, runs).await
    }

    pub async fn mark_stopped(&self) -> Result<(), DbError> {
        executors::mark_stopped(&self.conn.client, &self.executor_id, self.incarnation).await
    }
}

async fn lock_connection(
    target: &PgTarget,
    executor_id: &str,
) -> Result<DedicatedConnection, IdentityError> {
    let conn = db::connect_dedicated(target, &format!("spool-lock:{executor_id}"), None).await?;
    if !executors::try_lock_executor_id(&conn.client, executor_id).await? {
        return Err(IdentityError::InUse(executor_id.to_string()));
    }
    Ok(conn)
}
