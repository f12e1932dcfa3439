//! The executor's identity: a session advisory lock on the executor id, held on a dedicated
//! connection, plus the incarnation registered under that lock and its lease.
//!
//! A lock alone does not prove the holder alive: a host that died without a FIN keeps its
//! session (and lock) until the server notices. So the lock comes with a lease (see
//! `executor::lease`), and a process taking an id whose lock is held by a session whose lease has
//! expired ends that session (`pg_terminate_backend`) and goes on; a live holder still makes it
//! refuse. A process whose own lock connection froze does the same to its own stale session.
//!
//! Architecture invariant: the lock is never taken on a pooled connection (a pooled session lock
//! leaks to whoever gets the connection next), and the connection is made from the same
//! [`PgTarget`] as every other, so it honours `sslmode`. Every wait on it has a deadline.

use std::time::Duration;

use crate::db::executors::{self, LeaseTerms};
use crate::db::{self, DbError, DedicatedConnection, PgTarget};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("executor id {0:?} is held by another live process; stop it first, or give this process its own SPOOL_EXECUTOR_ID")]
    InUse(String),
    #[error("executor id {0:?} was taken over by a newer process while this one was disconnected; stopping")]
    Superseded(String),
    #[error("the executor lock connection did not answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A held executor id. Dropping it closes the lock connection and releases the id.
pub struct ExecutorLock {
    pub executor_id: String,
    pub incarnation: i64,
    /// The backend pid of the lock session: if the connection freezes, this process knows which
    /// stale session to end before it takes the lock again.
    pid: i32,
    terms: LeaseTerms,
    /// Deadline of every statement on the lock connection.
    deadline: Duration,
    conn: DedicatedConnection,
}

impl ExecutorLock {
    /// Takes the id and registers a new incarnation, or fails with [`IdentityError::InUse`]
    /// while another live process holds it. A holder whose lease has expired is ended first.
    pub async fn acquire(
        target: &PgTarget,
        executor_id: &str,
        workflows: &[String],
        queues: Option<&[String]>,
        terms: LeaseTerms,
        deadline: Duration,
    ) -> Result<Self, IdentityError> {
        let (conn, pid) = lock_connection(target, executor_id, None, deadline).await?;
        let incarnation = within(
            deadline,
            executors::register_incarnation(
                &conn.client,
                executor_id,
                workflows,
                queues,
                &terms,
                None,
            ),
        )
        .await??
        .expect("a fresh registration always returns an incarnation");
        Ok(Self {
            executor_id: executor_id.to_string(),
            incarnation,
            pid,
            terms,
            deadline,
            conn,
        })
    }

    /// Resolves when the lock connection has closed (the database restarted, the backend was
    /// terminated): the id is no longer held.
    pub async fn lost(&mut self) {
        let _ = (&mut self.conn.driver).await;
    }

    /// After [`ExecutorLock::lost`], or when the lock connection stopped answering: takes the id
    /// again (ending this process's own stale session if it still holds the lock) and checks
    /// that no newer incarnation started meanwhile.
    pub async fn reacquire(
        &mut self,
        target: &PgTarget,
        workflows: &[String],
        queues: Option<&[String]>,
    ) -> Result<(), IdentityError> {
        let (conn, pid) =
            match lock_connection(target, &self.executor_id, Some(self.pid), self.deadline).await {
                // someone else holds the id now: this process was taken over
                Err(IdentityError::InUse(id)) => return Err(IdentityError::Superseded(id)),
                other => other?,
            };
        // The id's lock is this session's from here on. If registering it times out (the
        // executors row is frozen too), the session lives on, blocked, still holding the lock:
        // the next attempt must recognise it as this process's own and end it, not take it for
        // another holder.
        self.pid = pid;
        let kept = within(
            self.deadline,
            executors::register_incarnation(
                &conn.client,
                &self.executor_id,
                workflows,
                queues,
                &self.terms,
                Some(self.incarnation),
            ),
        )
        .await??;
        if kept.is_none() {
            return Err(IdentityError::Superseded(self.executor_id.clone()));
        }
        self.conn = conn;
        Ok(())
    }

    /// Renews the lease. `Ok(false)`: this incarnation was superseded.
    pub async fn heartbeat(&self) -> Result<bool, IdentityError> {
        Ok(within(
            self.deadline,
            executors::heartbeat(&self.conn.client, &self.executor_id, self.incarnation),
        )
        .await??)
    }

    pub async fn set_probation(&self, runs: &[String]) -> Result<(), IdentityError> {
        Ok(within(
            self.deadline,
            executors::set_probation(&self.conn.client, &self.executor_id, self.incarnation, runs),
        )
        .await??)
    }

    pub async fn mark_stopped(&self) -> Result<(), IdentityError> {
        Ok(within(
            self.deadline,
            executors::mark_stopped(&self.conn.client, &self.executor_id, self.incarnation),
        )
        .await??)
    }
}

async fn within<T>(
    deadline: Duration,
    f: impl std::future::Future<Output = T>,
) -> Result<T, IdentityError> {
    tokio::time::timeout(deadline, f)
        .await
        .map_err(|_| IdentityError::Timeout(deadline))
}

/// Opens a lock connection and takes the id's lock on it. When the lock is held by a session
/// that is stale — its executor's lease expired, or it is `own_stale` (this process's previous,
/// frozen lock session) — that session is ended and the lock taken; a live holder is `InUse`.
async fn lock_connection(
    target: &PgTarget,
    executor_id: &str,
    own_stale: Option<i32>,
    deadline: Duration,
) -> Result<(DedicatedConnection, i32), IdentityError> {
    let conn = within(
        deadline,
        db::connect_dedicated(target, &format!("spool-lock:{executor_id}"), None),
    )
    .await??;
    let pid = within(deadline, executors::backend_pid(&conn.client)).await??;
    for _ in 0..3 {
        if within(
            deadline,
            executors::try_lock_executor_id(&conn.client, executor_id),
        )
        .await??
        {
            return Ok((conn, pid));
        }
        let Some((holder, expired)) =
            within(deadline, executors::lock_holder(&conn.client, executor_id)).await??
        else {
            continue; // released meanwhile
        };
        if !expired && own_stale != Some(holder) {
            return Err(IdentityError::InUse(executor_id.to_string()));
        }
        tracing::warn!(
            executor = executor_id,
            stale_pid = holder,
            "the executor id's lock is held by a stale session (its lease expired, or this process's own frozen connection); ending it"
        );
        let wait_ms = deadline.as_millis().min(5_000) as i64;
        within(
            deadline + Duration::from_millis(wait_ms as u64),
            executors::terminate_session(&conn.client, holder, wait_ms),
        )
        .await??;
    }
    Err(IdentityError::InUse(executor_id.to_string()))
}
