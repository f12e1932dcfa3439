//! Everything Spool says to PostgreSQL. One module per table (`runs`, `steps`, `executors`) owns
//! that table's SQL; no other module writes SQL. Every statement an executor makes for a run after
//! claiming it is a compare-and-set on (id, claim epoch, status) and is named for it
//! (`complete_if_owned`); zero rows affected comes back as [`DbError::Lost`], never ignored.
//!
//! This module never holds a transaction or a pooled connection across anything but its own
//! statements.

pub mod executors;
pub mod maintenance;
pub mod overview;
pub mod runs;
pub mod stats;
pub mod steps;
pub mod tls;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::task::JoinHandle;

pub use tls::PgTarget;

/// The fencing condition every write for a claimed run adds to its compare-and-set on (id,
/// claim_epoch, running): the incarnation that claimed the run (`r`) is still its executor's
/// current one, so a superseded process cannot write even before its successor re-claims.
macro_rules! claimer_is_current {
    () => {
        "exists (select 1 from spool.executors e
                  where e.id = r.executor_id and e.incarnation = r.incarnation)"
    };
}
pub(crate) use claimer_is_current;

/// Single-row writes find their row by id and say `(status = 'running') is true` rather than
/// `status = 'running'`: the same test (status is never null), which the planner cannot match to
/// the partial index of running runs (`runs_owned_idx`). Statistics gathered while a backlog was
/// queued and nothing ran estimate that index at one row; with the plain form the planner then
/// walked every running run to find one.
///
/// Batched writes go further: `batch_fence!(source, id)` is the body of a materialized CTE over
/// the writes of `source` (an `unnest(...) as u(...)` with the run id in `id`), each with its
/// run's claimer as the row holds it now (`claimer`, `claimer_incarnation`, read by primary key
/// one write at a time), kept only while that incarnation is its executor's current one, and
/// `was` = 'running'. The write then joins the runs on these columns alone. With a constant or a
/// correlated test on `spool.runs` instead, statistics taken while nothing ran (the claimer
/// columns all null, no run running) estimated the matching runs at one row, and the planner
/// walked every running run once per write: a batch of 512 finishes beside 2,048 running runs
/// made a million comparisons, and the drain's speed depended on when autovacuum had last
/// analyzed the table. Written this way every plan is linear in the batch. A run changed since
/// it was read here (claimed again) no longer matches the join, so the fence holds.
macro_rules! batch_fence {
    ($source:literal, $id:literal) => {
        concat!(
            "select u.*, x.claimer, x.claimer_incarnation, 'running'::text as was
               from ", $source, ",
                    lateral (select r.executor_id as claimer, r.incarnation as claimer_incarnation
                               from spool.runs r where r.id = ", $id, " offset 0) x
              where exists (select 1 from spool.executors e
                             where e.id = x.claimer and e.incarnation = x.claimer_incarnation)"
        )
    };
}
pub(crate) use batch_fence;

/// Errors from the database layer, classified by SQLSTATE and constraint name.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A fenced write affected zero rows: the run was re-claimed, released or finished by someone
    /// else. The caller must stop working on the run.
    #[error("lost ownership of run {0}")]
    Lost(String),
    /// A named CHECK or other constraint refused the row.
    #[error("constraint {constraint} refused the row: {message}")]
    Constraint { constraint: String, message: String },
    #[error("no database connection available: {0}")]
    Pool(String),
    /// A batched write got no outcome of its own (the executor is shutting down, or the
    /// statement answered nothing for it).
    #[error("batched write failed: {0}")]
    Batch(String),
    #[error("database error: {}", describe_pg(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::from_pg(e),
            other => DbError::Pool(other.to_string()),
        }
    }
}

impl DbError {
    /// Classifies a Postgres error: constraint violations keep their constraint name.
    pub fn from_pg(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            if db.code().code().starts_with("23") {
                return DbError::Constraint {
                    constraint: db.constraint().unwrap_or("").to_string(),
                    message: db.message().to_string(),
                };
            }
        }
        DbError::Postgres(e)
    }

    /// True when the database refused a write for the values it holds — a data exception (such
    /// as U+0000 in jsonb or text), a constraint, a value over a limit: SQLSTATE classes 22, 23
    /// and 54 — rather than for when or where it was sent, so sending it again would be refused
    /// again.
    pub fn is_value_refused(&self) -> bool {
        match self {
            DbError::Constraint { .. } => true,
            DbError::Postgres(e) => e
                .as_db_error()
                .is_some_and(|db| matches!(db.code().code().get(..2), Some("22" | "23" | "54"))),
            _ => false,
        }
    }

    /// True when the error is about reaching the database rather than about the statement.
    pub fn is_connectivity(&self) -> bool {
        match self {
            DbError::Pool(_) => true,
            DbError::Postgres(e) => pg_is_connectivity(e),
            _ => false,
        }
    }
}

/// A Postgres error with what the server said (tokio-postgres's own text is just "db error").
fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        // tokio-postgres names only the kind of failure ("error performing TLS handshake"); why
        // (an unknown issuer, a certificate for another host) is in its sources
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        }
    }
}

/// Closed connections, I/O errors, and the SQLSTATEs of a server that is going away or starting.
fn pg_is_connectivity(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Retries `op` while its error is about connectivity, with backoff, for up to `patience`.
pub async fn with_patience<T, F, Fut>(patience: Duration, mut op: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Duration::from_millis(50);
    loop {
        match op().await {
            Err(e) if e.is_connectivity() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "database unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Builds the shared connection pool.
pub fn pool(target: &PgTarget, max_size: usize, application_name: &str) -> Pool {
    pool_with(target.config.clone(), target, max_size, application_name)
}

/// Planner settings of the claim's own connections: walk the claim index in order, always.
///
/// The claim wants the first `n` claimable rows in `(priority, run_at, enqueue_seq)` order, which
/// an ordered scan of `runs_claim_idx` finds after reading about `n` entries. Without statistics
/// (a queue bulk-loaded before autovacuum analyzed it) the planner guesses the workflow filter is
/// selective and prefers a bitmap scan of every queued row plus a sort: 46 ms instead of 2 ms
/// with 50,000 queued. These settings rule that plan out; they apply to the claim and recovery
/// statements only, never to the API's queries.
const CLAIM_PLANNER_OPTIONS: &str = "-c enable_sort=off -c enable_bitmapscan=off";

/// A small pool for the executor's claim and recovery statements, with
/// [`CLAIM_PLANNER_OPTIONS`].
pub fn claim_pool(target: &PgTarget, application_name: &str) -> Pool {
    let mut config = target.config.clone();
    let options = match config.get_options() {
        Some(theirs) => format!("{theirs} {CLAIM_PLANNER_OPTIONS}"),
        None => CLAIM_PLANNER_OPTIONS.to_string(),
    };
    config.options(&options);
    pool_with(config, target, 2, application_name)
}

/// Server-side settings of every Spool session: the server notices a peer that vanished without
/// a FIN (a dead or partitioned host) in seconds — keepalive probes after 5 s idle, every 2 s, 3
/// unanswered end the session, and unacknowledged data ends it after 10 s — instead of after the
/// operating system's two hours, so a dead executor's session, and its lock, go too.
const DEAD_PEER_OPTIONS: &str = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=10000";

/// Applies [`DEAD_PEER_OPTIONS`] and the same client-side keepalives to a connection config.
fn detect_dead_peers(config: &mut tokio_postgres::Config) {
    let options = match config.get_options() {
        Some(theirs) => format!("{theirs} {DEAD_PEER_OPTIONS}"),
        None => DEAD_PEER_OPTIONS.to_string(),
    };
    config.options(&options);
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(10));
}

fn pool_with(
    mut config: tokio_postgres::Config,
    target: &PgTarget,
    max_size: usize,
    application_name: &str,
) -> Pool {
    config.application_name(application_name);
    config.connect_timeout(Duration::from_secs(5));
    detect_dead_peers(&mut config);
    let manager = Manager::from_config(
        config,
        target.tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .expect("pool config with a runtime is valid")
}

/// A connection that belongs to one task (listener, executor lock, migrations), never pooled.
/// The connection's driver task is owned: dropping this aborts it and closes the socket.
pub struct DedicatedConnection {
    pub client: tokio_postgres::Client,
    pub driver: JoinHandle<()>,
}

impl Drop for DedicatedConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens a dedicated connection whose asynchronous messages (NOTIFY) go to `messages`.
pub async fn connect_dedicated(
    target: &PgTarget,
    application_name: &str,
    messages: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) -> Result<DedicatedConnection, DbError> {
    use futures::StreamExt;
    let mut config = target.config.clone();
    config.application_name(application_name);
    config.connect_timeout(Duration::from_secs(5));
    detect_dead_peers(&mut config);
    let (client, mut connection) = config
        .connect(target.tls.clone())
        .await
        .map_err(DbError::from_pg)?;
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if let Some(tx) = &messages {
                        let _ = tx.send(n);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "dedicated connection closed");
                    break;
                }
            }
        }
    });
    Ok(DedicatedConnection { client, driver })
}

/// A connection statements can run on: a pooled client (statements cached per connection) or a
/// dedicated one (statements prepared per call).
pub trait Conn: Sync {
    fn stmt(
        &self,
        sql: &str,
    ) -> impl std::future::Future<Output = Result<tokio_postgres::Statement, tokio_postgres::Error>> + Send;
    fn pg(&self) -> &tokio_postgres::Client;
}

impl Conn for deadpool_postgres::Client {
    async fn stmt(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        self.prepare_cached(sql).await
    }
    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
}

impl Conn for tokio_postgres::Client {
    async fn stmt(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        self.prepare(sql).await
    }
    fn pg(&self) -> &tokio_postgres::Client {
        self
    }
}
