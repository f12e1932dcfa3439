//! Least privilege: `spool serve` and enqueuers under `deploy/roles.sql`'s roles on a database
//! they do not own; the migration history inside the `spool` schema; a migration lock held by
//! someone else is waited for with a log line and a timeout; `--no-migrate`.

use std::process::Command;
use std::time::Duration;

use spool::db::{self, PgTarget};

use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_terminal, wait_until, TestDb};

const ROLES_SQL: &str = include_str!("../../deploy/roles.sql");

/// `url` with another user name.
fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host) = rest.split_once('@').unwrap();
    format!("{scheme}://{user}@{host}")
}

async fn connect(url: &str) -> db::DedicatedConnection {
    db::connect_dedicated(&PgTarget::parse(url).unwrap(), "roles-test", None)
        .await
        .unwrap()
}

/// The SQLSTATE of a statement that must fail.
async fn refused(conn: &db::DedicatedConnection, sql: &str) -> String {
    match conn.client.batch_execute(sql).await {
        Ok(()) => panic!("{sql} was allowed"),
        Err(e) => e.code().map(|c| c.code().to_string()).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_and_an_enqueuer_work_under_their_roles_and_nothing_more() {
    let db = TestDb::new().await;
    db.exec(ROLES_SQL).await;
    db.exec(ROLES_SQL).await; // idempotent
                              // login roles (cluster-wide, so created once) that are members of the group roles
    db.exec(
        "do $$ begin
           if not exists (select from pg_roles where rolname = 'spool_t_exec') then
             create role spool_t_exec login in role spool_executor; end if;
           if not exists (select from pg_roles where rolname = 'spool_t_enq') then
             create role spool_t_enq login in role spool_enqueuer; end if;
           if not exists (select from pg_roles where rolname = 'spool_t_read') then
             create role spool_t_read login in role spool_reader; end if;
         end $$",
    )
    .await;
    let owner: String = db
        .client()
        .await
        .query_one(
            "select pg_get_userbyid(nspowner) from pg_namespace where nspname = 'spool'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "postgres", "the roles under test own nothing");

    // the executor, with and without --no-migrate (the schema is current: no DDL either way)
    let exec_url = as_user(&db.url, "spool_t_exec");
    let env = [("DATABASE_URL", exec_url.as_str())];
    let executor =
        SpoolProcess::spawn_with_args(Binary::Spool, &db, "least-1", &env, &["--no-migrate"]);
    executor.wait_alive(&db).await;
    let second = SpoolProcess::spawn(Binary::Spool, &db, "least-2", &env);
    second.wait_alive(&db).await;

    // the enqueuer: INSERT … RETURNING id, spool.enqueue, a keyed run with the replace policy
    let enq = connect(&as_user(&db.url, "spool_t_enq")).await;
    let by_insert: String = enq
        .client
        .query_one(
            "insert into spool.runs (workflow, input) values ('ticker', '{\"count\": 2, \"interval_ms\": 1}') returning id",
            &[],
        )
        .await
        .expect("INSERT … RETURNING id as the enqueuer")
        .get(0);
    let by_function: String = enq
        .client
        .query_one(
            "select spool.enqueue('noop', '{}', concurrency_key => 'k', key_policy => 'replace')",
            &[],
        )
        .await
        .expect("spool.enqueue as the enqueuer")
        .get(0);
    for id in [&by_insert, &by_function] {
        assert_eq!(
            wait_terminal(&db, id, Duration::from_secs(30)).await,
            "succeeded"
        );
        let status: String = enq
            .client
            .query_one("select status from spool.run_status($1)", &[id])
            .await
            .expect("spool.run_status as the enqueuer")
            .get(0);
        assert_eq!(status, "succeeded");
    }
    // the steps were written by the executor role
    let steps = db
        .scalar_i64(&format!(
            "select count(*) from spool.operation_outputs where run_id = '{by_insert}'"
        ))
        .await;
    assert_eq!(steps, 1);
    assert_eq!(refused(&enq, "select input from spool.runs").await, "42501");
    assert_eq!(
        refused(&enq, "update spool.runs set priority = 1").await,
        "42501"
    );
    assert_eq!(refused(&enq, "delete from spool.runs").await, "42501");
    assert_eq!(
        refused(&enq, "select * from spool.run_progress").await,
        "42501"
    );
    assert_eq!(refused(&enq, "select spool.cancel_run('x')").await, "42501");

    // the reader: the views, nothing else
    let read = connect(&as_user(&db.url, "spool_t_read")).await;
    for view in [
        "run_progress",
        "queue_depth",
        "unrunnable_runs",
        "executor_liveness",
    ] {
        read.client
            .batch_execute(&format!("select * from spool.{view}"))
            .await
            .unwrap_or_else(|e| panic!("the reader reads spool.{view}: {e}"));
    }
    let alive: i64 = read
        .client
        .query_one(
            "select count(*) from spool.executor_liveness where alive",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(alive, 2, "liveness is visible to the reader");
    assert_eq!(refused(&read, "select * from spool.runs").await, "42501");
    assert_eq!(
        refused(&read, "insert into spool.runs (workflow) values ('noop')").await,
        "42501"
    );
    assert_eq!(
        refused(&read, "select spool.enqueue('noop')").await,
        "42501"
    );

    // the executor role has no DDL
    let exec = connect(&exec_url).await;
    assert_eq!(
        refused(&exec, "create table spool.intruder (a int)").await,
        "42501"
    );
    drop(executor);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_keep_their_history_in_the_spool_schema_and_move_an_old_one_there() {
    let db = TestDb::empty().await;
    let spool = env!("CARGO_BIN_EXE_spool");
    let migrate = || {
        let out = Command::new(spool)
            .args(["migrate"])
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        !migrate().contains("[]"),
        "the first migration applies every version"
    );
    let tables = "select string_agg(n.nspname, ',' order by n.nspname) from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.relname = 'refinery_schema_history'";
    let location = |db: &TestDb| {
        let db = db.pool.clone();
        async move {
            let row = db
                .get()
                .await
                .unwrap()
                .query_one(tables, &[])
                .await
                .unwrap();
            row.get::<_, Option<String>>(0)
        }
    };
    assert_eq!(location(&db).await.as_deref(), Some("spool"));
    // a history an older version left in public is moved, and nothing is applied twice
    db.exec("alter table spool.refinery_schema_history set schema public")
        .await;
    assert!(migrate().contains("[]"), "nothing applied again");
    assert_eq!(location(&db).await.as_deref(), Some("spool"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_migration_lock_is_waited_for_with_a_log_line_then_given_up_with_its_holder() {
    let db = TestDb::empty().await;
    // anyone who can connect can take the lock
    let holder = connect(&db.url).await;
    holder
        .client
        .batch_execute(
            "set application_name = 'someone-else'; select pg_advisory_lock(8318271036100275559)",
        )
        .await
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["migrate"])
        .env("DATABASE_URL", &db.url)
        .env("SPOOL_MIGRATION_LOCK_TIMEOUT_MS", "1500")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("waiting for the migration lock"),
        "{stderr}"
    );
    assert!(
        stderr.contains("still held after") && stderr.contains("someone-else"),
        "{stderr}"
    );

    // released: `serve --no-migrate` on the unmigrated database waits, saying so, and starts as
    // soon as someone migrates
    drop(holder);
    let server = SpoolProcess::spawn_with_args(Binary::Spool, &db, "waits", &[], &["--no-migrate"]);
    wait_until(
        "the wait for a migration is logged",
        Duration::from_secs(30),
        || async {
            server
                .log_text()
                .contains("waiting for `spool migrate`")
                .then_some(())
        },
    )
    .await;
    let target = PgTarget::parse(&db.url).unwrap();
    spool::migrate::migrate(&target, Duration::from_secs(60))
        .await
        .unwrap();
    server.wait_alive(&db).await;
    // and one that nobody migrates for gives up with a clear error
    let other = TestDb::empty().await;
    let mut gives_up = SpoolProcess::spawn_with_args(
        Binary::Spool,
        &other,
        "gives-up",
        &[("SPOOL_MIGRATION_LOCK_TIMEOUT_MS", "500")],
        &["--no-migrate"],
    );
    assert!(!gives_up.wait_exit(Duration::from_secs(30)).await.success());
    assert!(
        gives_up
            .log_text()
            .contains("run `spool migrate` as the schema owner"),
        "{}",
        gives_up.log_text()
    );
}
