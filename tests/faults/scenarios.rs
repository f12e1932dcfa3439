use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use spool::sse_client::{self, SseEvent};

use crate::cluster::Cluster;
use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_steps, wait_terminal, wait_until, TestDb};
use crate::oracle::{figures, late_attach_check};

async fn ledger_ticker(db: &TestDb, id: &str, count: usize, interval_ms: u64, steps: usize) {
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input) values ('{id}', 'ledger_ticker', '{{\"count\": {count}, \"interval_ms\": {interval_ms}, \"steps\": {steps}}}')"
    ))
    .await;
}

async fn collect(base: String, run_id: &str) -> Vec<(Instant, SseEvent)> {
    let events = sse_client::attach(&base, None, run_id, None)
        .await
        .expect("attach");
    let mut events = Box::pin(events);
    let mut out = Vec::new();
    let read = async {
        while let Some(e) = events.next().await {
            let e = e.expect("event");
            let end = e.is_end();
            out.push((Instant::now(), e));
            if end {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(90), read)
        .await
        .expect("attach ended in time");
    out
}

/// Scenario 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_death_and_replay_late_attacher_sees_tick_one_exactly_once() {
    let mut c = Cluster::start(TestDb::new().await, 3, &[]).await;
    ledger_ticker(&c.db, "stream", 30, 40, 5).await;
    let owner = c.wait_owner("stream").await;
    let survivor = (owner + 1) % 3;
    let watcher = tokio::spawn(collect(c.base_url(survivor), "stream"));
    wait_steps(&c.db, "stream", 2).await;
    c.kill(owner).await;
    c.restart(owner).await;
    let restarted = Instant::now();
    let watched = watcher.await.unwrap();
    let first_replayed = watched
        .iter()
        .skip_while(|(_, e)| e.event != "reset")
        .find(|(_, e)| e.event == "chunk")
        .map(|(t, _)| t.duration_since(restarted))
        .expect("a replayed chunk after the reset");
    eprintln!(
        "figure: restart -> first replayed chunk: {} ms",
        first_replayed.as_millis()
    );
    let (duplicates, incomplete) =
        late_attach_check(&c.base_url(survivor), &[("stream".into(), 30)]).await;
    assert_eq!(
        (duplicates, incomplete),
        (0, 0),
        "a late attacher sees tick-1..tick-30 exactly once"
    );
    figures(&c.db, "true").await.assert_clean();
}

/// Scenario 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_a_survivor_finishes_the_run_from_its_last_memoized_step() {
    let mut c = Cluster::start(TestDb::new().await, 3, &[]).await;
    ledger_ticker(&c.db, "g", 24, 50, 6).await;
    let owner = c.wait_owner("g").await;
    wait_steps(&c.db, "g", 2).await;
    let mut p = c.procs[owner].take().unwrap();
    p.signal(Signal::SIGTERM);
    assert!(
        p.wait_exit(Duration::from_secs(20)).await.success(),
        "SIGTERM exits 0"
    );
    // no restart: a survivor must take it
    assert_eq!(
        wait_terminal(&c.db, "g", Duration::from_secs(30)).await,
        "succeeded"
    );
    let finisher = c.owner("g").await;
    assert!(finisher.is_none());
    let executor: String =
        c.db.client()
            .await
            .query_one("select executor_id from spool.runs where id = 'g'", &[])
            .await
            .unwrap()
            .get(0);
    assert_ne!(executor, Cluster::id(owner), "a survivor finished it");
    figures(&c.db, "true").await.assert_clean();
}

/// Scenario 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_across_executors_under_ten_kill_restart_cycles() {
    let mut c = Cluster::start(TestDb::new().await, 3, &[]).await;
    c.db.exec(
        "insert into spool.runs (workflow, max_attempts, concurrency_key, input)
         select 'ledger_ticker', 1000, 'key-' || k,
                jsonb_build_object('count', 2, 'interval_ms', 5, 'steps', 2, 'key', 'key-' || k)
           from generate_series(0, 19) n, generate_series(0, 29) k
          order by n, k",
    )
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for cycle in 0..10 {
        // pace the kills by progress, not by time
        let target = (cycle + 1) * 600 / 12;
        wait_until(
            "progress before the next kill",
            Duration::from_secs(60),
            || async {
                (c.db
                    .scalar_i64("select count(*) from spool.runs where status = 'succeeded'")
                    .await
                    >= target as i64)
                    .then_some(())
            },
        )
        .await;
        let victim = rng.random_range(0..3);
        c.kill(victim).await;
        c.restart(victim).await;
    }
    c.wait_all_terminal(Duration::from_secs(120)).await;
    let f = figures(&c.db, "true").await;
    eprintln!("figures: {f:?}");
    f.assert_clean();
}

/// Scenario 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_inserted_by_sql_starts_at_once_also_after_the_listener_is_terminated() {
    let db = TestDb::new().await;
    // with a two-minute poll, only the wake-up can start a run quickly
    let p = SpoolProcess::start(
        Binary::Spool,
        &db,
        "w",
        &[
            ("SPOOL_POLL_INTERVAL_MS", "120000"),
            ("SPOOL_RECOVERY_INTERVAL_MS", "120000"),
        ],
    )
    .await;
    wait_until(
        "the listener to connect",
        Duration::from_secs(10),
        || async {
            (db.scalar_i64(
                "select count(*) from pg_stat_activity where application_name = 'spool-listen:w' and datname = current_database()",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
    for (i, kill_listener) in [(1, false), (2, true)] {
        if kill_listener {
            db.exec("select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'spool-listen:w' and datname = current_database()").await;
        }
        let inserted = Instant::now();
        db.exec(&format!(
            "insert into spool.runs (id, workflow) values ('w{i}', 'noop')"
        ))
        .await;
        wait_until(
            &format!("run w{i} to start"),
            Duration::from_secs(5),
            || async { (db.status(&format!("w{i}")).await != "queued").then_some(()) },
        )
        .await;
        eprintln!(
            "figure: insert -> start (listener killed: {kill_listener}): {} ms",
            inserted.elapsed().as_millis()
        );
    }
    drop(p);
}

/// Scenario 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_run_executors_reconnect_and_every_run_completes_once() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("pg-{}", uuid::Uuid::new_v4().simple()));
    let pg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh");
    let start = |port: Option<u16>| {
        let mut cmd = std::process::Command::new(&pg);
        cmd.arg("start").arg(&dir).env("SPOOL_PG_DURABLE", "1");
        if let Some(p) = port {
            cmd.arg(p.to_string());
        }
        let out = cmd.output().expect("pg.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse::<u16>()
            .unwrap()
    };
    let port = start(None);
    let _cleanup = PgCleanup(pg.clone(), dir.clone());
    let db = TestDb::on_server(&format!("postgres://postgres@127.0.0.1:{port}")).await;
    let c = Cluster::start(db, 3, &[]).await;
    c.db.exec("insert into spool.runs (workflow, input) select 'ledger_ticker', '{\"count\": 10, \"interval_ms\": 50, \"steps\": 5}' from generate_series(1, 30)").await;
    wait_until(
        "some steps to be memoized",
        Duration::from_secs(30),
        || async {
            (c.db
                .scalar_i64("select count(*) from spool.operation_outputs")
                .await
                >= 10)
                .then_some(())
        },
    )
    .await;
    let out = std::process::Command::new(&pg)
        .arg("kill")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    start(Some(port));
    c.wait_all_terminal(Duration::from_secs(120)).await;
    let mut c = c;
    for (i, p) in c.procs.iter_mut().enumerate() {
        assert!(
            !p.as_mut().unwrap().try_exited(),
            "executor {i} stayed up through the restart"
        );
    }
    let f = figures(&c.db, "true").await;
    eprintln!("figures: {f:?}");
    f.assert_clean();
}

struct PgCleanup(std::path::PathBuf, std::path::PathBuf);

impl Drop for PgCleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.0)
            .arg("stop")
            .arg(&self.1)
            .output();
    }
}

/// Scenario 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_stream_runs_complete_and_attachers_get_the_protocols_behaviour() {
    let mut c = Cluster::start(TestDb::new().await, 3, &[]).await;
    for i in 0..3 {
        ledger_ticker(&c.db, &format!("n{i}"), 30, 40, 5).await;
    }
    let base = c.base_url(0);
    let watcher = tokio::spawn(collect(base.clone(), "n0"));
    wait_steps(&c.db, "n0", 1).await;
    c.nats.kill();
    c.wait_all_terminal(Duration::from_secs(90)).await;
    c.nats.restart().await;
    let watched = watcher.await.unwrap();
    assert!(
        watched.iter().any(|(_, e)| e.event == "unavailable"),
        "an explicit event, not silence"
    );
    let last = &watched.last().unwrap().1;
    assert_eq!(
        (last.event.as_str(), last.data.as_str()),
        ("done", "{\"ticks\":30}")
    );
    // once the outputs are republished, late attachers see each exactly once
    wait_until(
        "the outputs to be republished",
        Duration::from_secs(60),
        || async {
            let text = reqwest::get(format!("{base}/v1/runs/n2/stream"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (text.matches("event: chunk").count() == 30 && text.contains("event: done"))
                .then_some(())
        },
    )
    .await;
    let runs: Vec<(String, usize)> = (0..3).map(|i| (format!("n{i}"), 30)).collect();
    wait_until(
        "every output to be whole",
        Duration::from_secs(60),
        || async { (late_attach_check(&base, &runs).await == (0, 0)).then_some(()) },
    )
    .await;
    figures(&c.db, "true").await.assert_clean();
}

/// Scenario 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_executor_id_twice_refuses_and_a_rolling_restart_strands_nothing() {
    let mut c = Cluster::start(TestDb::new().await, 2, &[]).await;
    let mut dup = c.spawn(0, &[]).await;
    assert!(!dup.wait_exit(Duration::from_secs(20)).await.success());
    assert!(
        dup.log_text().contains("held by another live process"),
        "{}",
        dup.log_text()
    );

    c.db.exec("insert into spool.runs (workflow, input) select 'ledger_ticker', '{\"count\": 8, \"interval_ms\": 50, \"steps\": 4}' from generate_series(1, 12)").await;
    wait_until("spool-1 to own runs", Duration::from_secs(30), || async {
        (c.db.scalar_i64("select count(*) from spool.runs where executor_id = 'spool-1' and status = 'running'").await > 0).then_some(())
    })
    .await;
    // rolling restart: the old spool-1 drains while the new one waits for the id
    let mut old = c.procs[0].take().unwrap();
    old.signal(Signal::SIGTERM);
    let new = c.spawn(0, &[("SPOOL_LOCK_WAIT_MS", "30000")]).await;
    assert!(old.wait_exit(Duration::from_secs(30)).await.success());
    new.wait_alive(&c.db).await;
    c.procs[0] = Some(new);
    c.wait_all_terminal(Duration::from_secs(60)).await;
    let f = figures(&c.db, "true").await;
    f.assert_clean();
    let stale =
        c.db.scalar_i64(
            "select count(*) from spool.operation_outputs o join spool.runs r on r.id = o.run_id
              where o.claim_epoch > r.claim_epoch",
        )
        .await;
    assert_eq!(stale, 0);
}

/// Scenario 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_run_ends_dead_and_the_executors_serve_other_runs_between_restarts() {
    let mut c = Cluster::start(TestDb::new().await, 3, &[]).await;
    c.db.exec(
        "insert into spool.runs (id, workflow, max_attempts) values ('poison', 'abort', 3);
         insert into spool.runs (workflow, input) select 'ledger_ticker', '{\"count\": 3, \"interval_ms\": 10, \"steps\": 3}' from generate_series(1, 20);",
    )
    .await;
    let mut restarts = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "runs did not finish by the deadline"
        );
        let done = c
            .db
            .scalar_i64("select count(*) from spool.runs where status in ('queued', 'running')")
            .await
            == 0;
        if done {
            break;
        }
        for i in 0..3 {
            let Some(status) = c.procs[i].as_mut().and_then(|p| p.try_status()) else {
                continue;
            };
            // Only the poison aborts; any other exit is a test failure, not a crash to count.
            assert_eq!(
                status.signal(),
                Some(Signal::SIGABRT as i32),
                "executor {i} exited for another reason ({status}): {}",
                c.procs[i].as_ref().unwrap().log_text()
            );
            restarts += 1;
            assert!(
                restarts <= 10,
                "too many crashes: the poison run was not given up"
            );
            // No waiting for it to come up: it may crash again at once. The lock wait covers
            // the moment before the database notices the dead process's lock connection.
            c.procs[i] = Some(c.spawn(i, &[("SPOOL_LOCK_WAIT_MS", "10000")]).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a deadline wait
    }
    assert_eq!(c.db.status("poison").await, "dead");
    let error: Value =
        c.db.client()
            .await
            .query_one("select error from spool.runs where id = 'poison'", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(error["code"], "attempts_exhausted");
    assert_eq!(restarts, 3, "one crash per allowed attempt");
    figures(&c.db, "r.id <> 'poison'").await.assert_clean();
}

/// Scenario 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_inserted_nonsense_ends_in_clear_documented_states_with_zero_panics() {
    let c = Cluster::start(TestDb::new().await, 3, &[]).await;
    c.db.exec(
        "insert into spool.runs (id, workflow) values ('unknown', 'no-such-workflow');
         insert into spool.runs (id, workflow, input) values ('wrong-shape', 'ledger_ticker', '{\"count\": \"many\"}');
         insert into spool.runs (id, workflow, input) values ('not-an-object', 'ticker', '[1, 2, 3]');
         insert into spool.runs (id, workflow, run_at) values ('far', 'noop', now() + interval '100 years');
         insert into spool.runs (id, workflow) values ('fine', 'noop');",
    )
    .await;
    let long_key =
        c.db.client()
            .await
            .batch_execute(&format!(
                "insert into spool.runs (workflow, concurrency_key) values ('noop', '{}')",
                "k".repeat(10_000)
            ))
            .await
            .expect_err("a 10,000-character key is refused");
    assert_eq!(
        long_key.as_db_error().unwrap().constraint(),
        Some("runs_concurrency_key_length")
    );

    assert_eq!(
        wait_terminal(&c.db, "fine", Duration::from_secs(20)).await,
        "succeeded"
    );
    assert_eq!(
        wait_terminal(&c.db, "wrong-shape", Duration::from_secs(20)).await,
        "failed"
    );
    assert_eq!(
        wait_terminal(&c.db, "not-an-object", Duration::from_secs(20)).await,
        "failed"
    );
    for id in ["wrong-shape", "not-an-object"] {
        let error: Value =
            c.db.client()
                .await
                .query_one("select error from spool.runs where id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
        assert_eq!(error["code"], "invalid_input", "{id}");
    }
    assert_eq!(c.db.status("unknown").await, "queued");
    assert_eq!(c.db.status("far").await, "queued");
    let reason: String =
        c.db.client()
            .await
            .query_one(
                "select reason from spool.unrunnable_runs where id = 'unknown'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    assert!(reason.contains("no-such-workflow"));
    let scheduled = c.db.scalar_i64("select scheduled from spool.queue_depth where queue = 'default' and concurrency_key is null").await;
    assert_eq!(scheduled, 1, "the century-away run waits as scheduled");
    assert_eq!(
        c.db.scalar_i64("select attempt::int8 from spool.runs where id = 'unknown'")
            .await,
        0
    );
    assert!(!c.logs().contains("panicked"), "zero panics");
}

/// Scenario 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_zombie_executor_cannot_write_for_runs_it_no_longer_owns() {
    let mut c = Cluster::start(TestDb::new().await, 1, &[]).await;
    c.db.exec("insert into spool.runs (workflow, input) select 'ledger_ticker', '{\"count\": 10, \"interval_ms\": 100, \"steps\": 5}' from generate_series(1, 4)").await;
    wait_until("steps to be memoized", Duration::from_secs(30), || async {
        (c.db
            .scalar_i64("select count(*) from spool.operation_outputs")
            .await
            >= 4)
            .then_some(())
    })
    .await;
    let zombie = c.procs[0].take().unwrap();
    zombie.stop_and_wait_stopped().await;
    // The database drops the stopped process's lock connection (as a network partition would),
    // and a new process takes the id over: a new incarnation re-claims the runs.
    c.db.exec("select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'spool-lock:spool-1' and datname = current_database()").await;
    let successor = c.spawn(0, &[("SPOOL_LOCK_WAIT_MS", "20000")]).await;
    wait_until(
        "the successor to register a new incarnation",
        Duration::from_secs(30),
        || async {
            (c.db
                .scalar_i64("select incarnation from spool.executors where id = 'spool-1'")
                .await
                == 2)
                .then_some(())
        },
    )
    .await;
    let takeover: chrono::DateTime<chrono::Utc> =
        c.db.client()
            .await
            .query_one(
                "select started_at from spool.executors where id = 'spool-1'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    c.procs[0] = Some(successor);
    zombie.signal(Signal::SIGCONT);
    c.wait_all_terminal(Duration::from_secs(60)).await;
    let mut zombie = zombie;
    assert!(
        !zombie.wait_exit(Duration::from_secs(30)).await.success(),
        "the superseded process stops"
    );
    let late_writes = c
        .db
        .client()
        .await
        .query_one(
            "select count(*) from spool.operation_outputs o join spool.runs r on r.id = o.run_id
              where o.claim_epoch < r.claim_epoch and o.finished_at > $1",
            &[&takeover],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(
        late_writes, 0,
        "no write of the zombie was accepted after the takeover"
    );
    figures(&c.db, "true").await.assert_clean();
}
