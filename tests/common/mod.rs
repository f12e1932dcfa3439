//! Test harness: each test gets its own database cloned from the migrated template that
//! `just test` prepares, plus helpers to start executors (in process or as real `spool`
//! processes) and to wait on conditions with deadlines (never on sleeps).
#![allow(dead_code)]

pub mod nats;
pub mod process;
pub mod relay;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use spool::db::{self, PgTarget};
use spool::executor::{self, ExecutorSettings, Metrics, RunningExecutor};
use spool::Registry;

/// One test's private database.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub target: PgTarget,
    pub pool: Pool,
}

impl TestDb {
    pub async fn new() -> Self {
        let base = std::env::var("SPOOL_TEST_PG")
            .expect("SPOOL_TEST_PG is not set: run the suite with `just test`, which starts a private PostgreSQL");
        let template =
            std::env::var("SPOOL_TEST_TEMPLATE").unwrap_or_else(|_| "spool_template".into());
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = PgTarget::parse(&format!("{base}/postgres?sslmode=disable")).unwrap();
        let conn = db::connect_dedicated(&admin, "spool-test-admin", None)
            .await
            .unwrap();
        let mut tries = 0;
        loop {
            match conn
                .client
                .batch_execute(&format!("create database {name} template {template}"))
                .await
            {
                Ok(()) => break,
                // concurrent clones of one template can briefly collide
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("create database retry: {e}");
                    let backoff = Duration::from_millis(20 * tries);
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => panic!("cannot create test database: {e}"),
            }
        }
        let url = format!("{base}/{name}?sslmode=disable");
        let target = PgTarget::parse(&url).unwrap();
        let pool = db::pool(&target, 24, "spool-test");
        Self {
            name,
            url,
            target,
            pool,
        }
    }

    /// A new database on the suite's server with nothing in it (not migrated).
    pub async fn empty() -> Self {
        let base = std::env::var("SPOOL_TEST_PG").expect("SPOOL_TEST_PG: run with `just test`");
        Self::create(&base, false).await
    }

    /// A new, migrated database on another server (a private cluster a test restarts).
    pub async fn on_server(base: &str) -> Self {
        Self::create(base, true).await
    }

    async fn create(base: &str, migrate: bool) -> Self {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = PgTarget::parse(&format!("{base}/postgres?sslmode=disable")).unwrap();
        let conn = db::connect_dedicated(&admin, "spool-test-admin", None)
            .await
            .unwrap();
        conn.client
            .batch_execute(&format!("create database {name}"))
            .await
            .unwrap();
        let url = format!("{base}/{name}?sslmode=disable");
        let target = PgTarget::parse(&url).unwrap();
        if migrate {
            spool::migrate::migrate(&target, Duration::from_secs(60))
                .await
                .unwrap();
        }
        let pool = db::pool(&target, 24, "spool-test");
        Self {
            name,
            url,
            target,
            pool,
        }
    }

    pub async fn client(&self) -> deadpool_postgres::Client {
        self.pool.get().await.expect("test pool")
    }

    /// Runs one SQL statement with no parameters.
    pub async fn exec(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    pub async fn status(&self, run_id: &str) -> String {
        self.client()
            .await
            .query_one("select status from spool.runs where id = $1", &[&run_id])
            .await
            .unwrap()
            .get(0)
    }

    /// Starts an in-process executor with fast timers.
    pub async fn executor(&self, id: &str, registry: Registry) -> RunningExecutor {
        self.executor_with(settings(id), registry).await
    }

    pub async fn executor_with(
        &self,
        settings: ExecutorSettings,
        registry: Registry,
    ) -> RunningExecutor {
        init_test_log();
        executor::start(
            settings,
            self.target.clone(),
            db::pool(&self.target, 24, "spool-test-executor"),
            registry,
            executor::discard_chunks(),
            Arc::new(Metrics::default()),
        )
        .await
        .expect("executor starts")
    }
}

/// Executor settings for tests: short poll and recovery intervals, a wait for the id's lock.
pub fn settings(id: &str) -> ExecutorSettings {
    let mut s = ExecutorSettings::new(id);
    s.poll_interval = Duration::from_millis(100);
    s.recovery_interval = Duration::from_millis(300);
    s.grace_period = Duration::from_secs(5);
    s.lock_wait = Duration::from_secs(10);
    s
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a deadline wait
    }
}

/// Waits until the run reaches a terminal status and returns it.
pub async fn wait_terminal(db: &TestDb, run_id: &str, deadline: Duration) -> String {
    wait_until(&format!("run {run_id} to finish"), deadline, || async {
        let s = db.status(run_id).await;
        spool::db::runs::is_terminal(&s).then_some(s)
    })
    .await
}

/// Memoized steps of a run so far.
pub async fn steps_done(db: &TestDb, run_id: &str) -> i64 {
    db.scalar_i64(&format!(
        "select count(*) from spool.operation_outputs where run_id = '{run_id}'"
    ))
    .await
}

/// Waits until a run has memoized at least `n` steps.
pub async fn wait_steps(db: &TestDb, run_id: &str, n: i64) {
    wait_until(
        &format!("run {run_id} to record {n} steps"),
        Duration::from_secs(30),
        || async { (steps_done(db, run_id).await >= n).then_some(()) },
    )
    .await;
}

/// With `SPOOL_TEST_LOG` set (an env-filter such as `spool=debug`), in-process executors log to
/// the test's output.
pub fn init_test_log() {
    if let Ok(filter) = std::env::var("SPOOL_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}
