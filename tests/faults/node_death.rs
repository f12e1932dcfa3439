//! Node death and partitions that send no FIN (issue 9): real executors reach Postgres and NATS
//! through relays (`common::relay`), and a test black-holes or freezes one node's network. The
//! server then keeps that node's sessions, and its executor-id lock, for as long as the relay
//! lives; only the lease (`SPOOL_LEASE_MS`) can say that the node is gone, and takeover
//! (`SPOOL_TAKEOVER_AFTER_MS`) hands its runs to the survivors. Leases and takeover delays are
//! 2 s here, so each scenario takes a few seconds.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use nix::sys::signal::Signal;

use crate::cluster::Cluster;
use crate::common::{wait_until, TestDb};
use crate::oracle::{figures, late_attach_check};

pub const LEASE_MS: u64 = 2_000;
pub const TAKEOVER_AFTER_MS: u64 = 2_000;
pub const LEASE_ENV: &[(&str, &str)] = &[
    ("SPOOL_LEASE_MS", "2000"),
    ("SPOOL_TAKEOVER_AFTER_MS", "2000"),
];

/// Adoption is due `lease + takeover` after the last renewal; this allows the survivors' adoption
/// pass, their claim, and a loaded 2-core machine on top.
pub fn adoption_deadline() -> Duration {
    Duration::from_millis(LEASE_MS + TAKEOVER_AFTER_MS) + Duration::from_secs(8)
}

/// Inserts `n` `ledger_ticker` runs `{prefix}{i}` of `count` ticks over `steps` steps.
async fn insert_runs(db: &TestDb, prefix: &str, n: usize, count: usize, interval_ms: u64) {
    db.exec(&format!(
        "insert into spool.runs (id, workflow, max_attempts, input)
         select '{prefix}' || i, 'ledger_ticker', 1000,
                jsonb_build_object('count', {count}, 'interval_ms', {interval_ms}, 'steps', 5)
           from generate_series(1, {n}) i order by i"
    ))
    .await;
}

/// The running runs of `executor` with their claim epochs.
pub async fn owned_running(db: &TestDb, executor: &str) -> Vec<(String, i64)> {
    db.client()
        .await
        .query(
            "select id, claim_epoch from spool.runs
              where executor_id = $1 and status = 'running' order by id",
            &[&executor],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `executor` owns at least `n` running runs that have each memoized a step.
async fn wait_owns_started_runs(db: &TestDb, executor: &str, n: i64) {
    wait_until(
        &format!("{executor} to own {n} runs that memoized a step"),
        Duration::from_secs(30),
        || async {
            let started = db
                .client()
                .await
                .query_one(
                    "select count(*) from spool.runs r
                      where r.executor_id = $1 and r.status = 'running'
                        and exists (select 1 from spool.operation_outputs o where o.run_id = r.id)",
                    &[&executor],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            (started >= n).then_some(())
        },
    )
    .await;
}

/// Waits until every run of `owned` has been taken from `old_owner` (a new claim epoch and
/// another executor, or finished at a new epoch) and returns how long that took.
pub async fn wait_adopted(
    db: &TestDb,
    owned: &[(String, i64)],
    old_owner: &str,
    deadline: Duration,
) -> Duration {
    let started = Instant::now();
    let ids: Vec<String> = owned.iter().map(|(id, _)| id.clone()).collect();
    let epochs: Vec<i64> = owned.iter().map(|(_, e)| *e).collect();
    loop {
        let pending = db
            .client()
            .await
            .query(
                "select r.id, r.status, r.executor_id, r.claim_epoch, r.concurrency_key
                   from spool.runs r
                   join unnest($1::text[], $2::int8[]) o(id, epoch) on o.id = r.id
                  where not (r.claim_epoch > o.epoch
                             and r.status <> 'queued'
                             and r.executor_id is distinct from $3)",
                &[&ids, &epochs, &old_owner],
            )
            .await
            .unwrap();
        if pending.is_empty() {
            return started.elapsed();
        }
        if started.elapsed() > deadline {
            for r in &pending {
                let (id, status, owner, epoch, key): (
                    String,
                    String,
                    Option<String>,
                    i64,
                    Option<String>,
                ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
                eprintln!("not adopted: {id} {status} owner {owner:?} epoch {epoch} key {key:?}");
            }
            let liveness = db
                .client()
                .await
                .query(
                    "select id, alive, lock_held, incarnation, since_heartbeat::text, takeover_at::text
                       from spool.executor_liveness order by id",
                    &[],
                )
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| {
                            format!(
                                "{} alive {} lock {} inc {} since {} takeover {:?}",
                                r.get::<_, String>(0),
                                r.get::<_, bool>(1),
                                r.get::<_, bool>(2),
                                r.get::<_, i64>(3),
                                r.get::<_, String>(4),
                                r.get::<_, Option<String>>(5)
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            eprintln!("executors: {liveness:#?}");
            panic!(
                "timed out after {deadline:?} waiting for the runs of {old_owner} to be adopted by another executor"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a deadline wait
    }
}

/// Sessions on the server that hold (or held) `executor`'s id lock.
pub async fn lock_sessions(db: &TestDb, executor: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "select count(*) from pg_stat_activity
              where application_name = $1 and datname = current_database()",
            &[&format!("spool-lock:{executor}")],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn db_now(db: &TestDb) -> DateTime<Utc> {
    db.client()
        .await
        .query_one("select now()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Step records and terminal transitions of `runs` that the database accepted after `since`
/// from a claim epoch older than the run's current one (a superseded owner's writes).
pub async fn stale_writes_after(db: &TestDb, runs: &[String], since: DateTime<Utc>) -> i64 {
    db.client()
        .await
        .query_one(
            "select count(*) from spool.operation_outputs o join spool.runs r on r.id = o.run_id
              where r.id = any($1) and o.claim_epoch < r.claim_epoch and o.finished_at > $2",
            &[&runs, &since],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs of `runs` whose terminal transition was made by `executor`.
async fn finished_by(db: &TestDb, runs: &[String], executor: &str) -> i64 {
    db.client()
        .await
        .query_one(
            "select count(*) from spool.runs where id = any($1) and executor_id = $2
                and status in ('succeeded', 'failed', 'cancelled', 'dead')",
            &[&runs, &executor],
        )
        .await
        .unwrap()
        .get(0)
}

fn ids(owned: &[(String, i64)]) -> Vec<String> {
    owned.iter().map(|(id, _)| id.clone()).collect()
}

/// (a) A node dies without a FIN and its id never comes back: its lock session stays open on
/// the server, yet the survivors adopt its runs after the lease and the takeover delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_death_without_fin_survivors_adopt_its_runs_and_each_completes_once() {
    let mut c = Cluster::start_relayed(TestDb::new().await, 1, LEASE_ENV).await;
    insert_runs(&c.db, "a", 6, 20, 100).await;
    wait_owns_started_runs(&c.db, "spool-1", 6).await;
    c.add().await;
    c.add().await;
    let owned = owned_running(&c.db, "spool-1").await;
    c.relays(0).black_hole();
    c.kill(0).await;
    assert_eq!(
        lock_sessions(&c.db, "spool-1").await,
        1,
        "the dead node's lock session stays open behind the black hole"
    );
    let took = wait_adopted(&c.db, &owned, "spool-1", adoption_deadline()).await;
    eprintln!("figure: death -> runs adopted: {} ms", took.as_millis());
    c.wait_all_terminal(Duration::from_secs(60)).await;
    assert_eq!(finished_by(&c.db, &ids(&owned), "spool-1").await, 0);
    let runs: Vec<(String, usize)> = owned.iter().map(|(id, _)| (id.clone(), 20)).collect();
    assert_eq!(
        late_attach_check(&c.base_url(1), &runs).await,
        (0, 0),
        "late attachers see every chunk exactly once"
    );
    figures(&c.db, "true").await.assert_clean();
}

/// (b) A node whose connections freeze stops executing on its own within about the lease; the
/// survivor adopts its runs; SIGTERM ends it in time although every connection it has is frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_stops_executing_within_the_lease_and_exits_on_sigterm() {
    let mut c = Cluster::start_relayed(TestDb::new().await, 1, LEASE_ENV).await;
    insert_runs(&c.db, "b", 4, 30, 100).await;
    wait_owns_started_runs(&c.db, "spool-1", 4).await;
    c.add().await;
    let owned = owned_running(&c.db, "spool-1").await;
    let lapses = c.proc(0).metric("spool_lease_lapses_total").await;
    c.relays(0).freeze();
    let frozen = Instant::now();
    // its HTTP API is not behind the relay: it tells what the process itself does
    wait_until(
        "the frozen executor to stop executing (a lease lapse, nothing in flight)",
        Duration::from_millis(LEASE_MS) + Duration::from_secs(3),
        || async {
            let p = c.proc(0);
            let lapsed = p.metric("spool_lease_lapses_total").await? > lapses.unwrap_or(0.0);
            let idle = p.metric("spool_runs_in_flight").await? == 0.0;
            (lapsed && idle).then_some(())
        },
    )
    .await;
    eprintln!(
        "figure: freeze -> executor stopped on its own: {} ms",
        frozen.elapsed().as_millis()
    );
    wait_adopted(&c.db, &owned, "spool-1", adoption_deadline()).await;
    let mut p = c.procs[0].take().unwrap();
    p.signal(Signal::SIGTERM);
    let status = p.wait_exit(Duration::from_secs(10)).await;
    eprintln!("frozen executor exited on SIGTERM: {status}");
    c.wait_all_terminal(Duration::from_secs(60)).await;
    assert_eq!(finished_by(&c.db, &ids(&owned), "spool-1").await, 0);
    figures(&c.db, "true").await.assert_clean();
}

/// (c) A partition heals after the takeover: the old owner's held writes and chunks reach the
/// database and NATS late, and none is accepted or shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_healed_after_takeover_the_old_owner_writes_and_shows_nothing() {
    let mut c = Cluster::start_relayed(TestDb::new().await, 1, LEASE_ENV).await;
    insert_runs(&c.db, "c", 4, 30, 100).await;
    wait_owns_started_runs(&c.db, "spool-1", 4).await;
    c.add().await;
    let owned = owned_running(&c.db, "spool-1").await;
    let runs = ids(&owned);
    c.relays(0).black_hole();
    wait_adopted(&c.db, &owned, "spool-1", adoption_deadline()).await;
    let adopted_by_b =
        c.db.client()
            .await
            .query_one(
                "select count(*) from spool.runs where id = any($1) and executor_id = 'spool-2'",
                &[&runs],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
    assert_eq!(adopted_by_b, runs.len() as i64, "spool-2 adopted every run");
    let takeover = db_now(&c.db).await;
    c.relays(0).heal();
    let healed = db_now(&c.db).await;
    // the old owner is heard from again (it renews, or it gives up and exits)
    let mut old_owner = c.procs[0].take().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let renewed =
            c.db.client()
                .await
                .query_one(
                    "select heartbeat_at > $1 from spool.executors where id = 'spool-1'",
                    &[&healed],
                )
                .await
                .unwrap()
                .get::<_, bool>(0);
        if renewed || old_owner.try_exited() {
            break;
        }
        assert!(
            Instant::now() < end,
            "the healed executor neither reached the database again nor exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a deadline wait
    }
    c.procs[0] = Some(old_owner);
    c.wait_all_terminal(Duration::from_secs(60)).await;
    assert_eq!(
        stale_writes_after(&c.db, &runs, takeover).await,
        0,
        "no step of the old owner's epochs was accepted after the takeover"
    );
    let late_finishes = c.db.client().await.query_one(
        "select count(*) from spool.runs where id = any($1) and (executor_id = 'spool-1' or finished_at is null)",
        &[&runs],
    ).await.unwrap().get::<_, i64>(0);
    assert_eq!(late_finishes, 0, "no run finished by the old owner");
    let attach: Vec<(String, usize)> = runs.iter().map(|id| (id.clone(), 30)).collect();
    assert_eq!(
        late_attach_check(&c.base_url(1), &attach).await,
        (0, 0),
        "late attachers see every chunk exactly once, nothing of the old owner"
    );
    figures(&c.db, "true").await.assert_clean();
}

/// (d) A StatefulSet scaled down from 3 to 2: `spool-3` is killed mid-run and never returns;
/// its runs are adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_three_to_two_the_removed_executors_runs_are_adopted() {
    let mut c = Cluster::start_relayed(TestDb::new().await, 3, LEASE_ENV).await;
    insert_runs(&c.db, "d", 30, 20, 100).await;
    wait_owns_started_runs(&c.db, "spool-3", 1).await;
    let owned = owned_running(&c.db, "spool-3").await;
    c.kill(2).await;
    let took = wait_adopted(&c.db, &owned, "spool-3", adoption_deadline()).await;
    eprintln!(
        "figure: scale-down -> runs adopted: {} ms",
        took.as_millis()
    );
    c.wait_all_terminal(Duration::from_secs(90)).await;
    assert_eq!(finished_by(&c.db, &ids(&owned), "spool-3").await, 0);
    let runs: Vec<(String, usize)> = owned.iter().map(|(id, _)| (id.clone(), 20)).collect();
    assert_eq!(late_attach_check(&c.base_url(0), &runs).await, (0, 0));
    figures(&c.db, "true").await.assert_clean();
}

/// (e) A rolling restart: each of three executors in turn gets SIGTERM and comes back under the
/// same id (waiting for the draining one) while runs flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_stable_ids_completes_every_run_once() {
    let mut c = Cluster::start_relayed(TestDb::new().await, 3, LEASE_ENV).await;
    for i in 0..3 {
        insert_runs(&c.db, &format!("e{i}-"), 30, 20, 50).await;
        wait_owns_started_runs(&c.db, &Cluster::id(i), 1).await;
        let mut old = c.procs[i].take().unwrap();
        old.signal(Signal::SIGTERM);
        let new = c.spawn(i, &[("SPOOL_LOCK_WAIT_MS", "30000")]).await;
        assert!(old.wait_exit(Duration::from_secs(30)).await.success());
        new.wait_alive(&c.db).await;
        new.wait_http().await;
        c.procs[i] = Some(new);
    }
    c.wait_all_terminal(Duration::from_secs(90)).await;
    let stale =
        c.db.scalar_i64(
            "select count(*) from spool.operation_outputs o join spool.runs r on r.id = o.run_id
              where o.claim_epoch > r.claim_epoch",
        )
        .await;
    assert_eq!(stale, 0);
    let runs: Vec<(String, usize)> = (0..3)
        .flat_map(|i| (1..=30).map(move |j| (format!("e{i}-{j}"), 20)))
        .collect();
    assert_eq!(late_attach_check(&c.base_url(0), &runs).await, (0, 0));
    figures(&c.db, "true").await.assert_clean();
}

/// (f) The same id returns after a black-holed death (takeover disabled): its dead predecessor's
/// session still holds the lock, but its lease expired, so the new process ends that session and
/// starts within about the lease (not after the server's two-hour keepalive), then replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_returns_after_a_black_holed_death_within_about_the_lease_and_replays() {
    let env = [("SPOOL_LEASE_MS", "2000"), ("SPOOL_TAKEOVER_AFTER_MS", "0")];
    let mut c = Cluster::start_relayed(TestDb::new().await, 1, &env).await;
    insert_runs(&c.db, "f", 4, 20, 100).await;
    wait_owns_started_runs(&c.db, "spool-1", 4).await;
    let owned = owned_running(&c.db, "spool-1").await;
    c.relays(0).black_hole();
    c.kill(0).await;
    let killed = Instant::now();
    assert_eq!(lock_sessions(&c.db, "spool-1").await, 1);
    let stale_pid: i32 =
        c.db.client()
            .await
            .query_one(
                "select pid from pg_stat_activity
              where application_name = 'spool-lock:spool-1' and datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
    let p = c.spawn(0, &[("SPOOL_LOCK_WAIT_MS", "30000")]).await;
    wait_until(
        "spool-1 to start again (a new incarnation, alive)",
        Duration::from_millis(LEASE_MS) + Duration::from_secs(5),
        || async {
            let row =
                c.db.client()
                    .await
                    .query_opt(
                        "select 1 from spool.executor_liveness where id = 'spool-1' and alive
                        and incarnation = 2",
                        &[],
                    )
                    .await
                    .unwrap();
            row.map(|_| ())
        },
    )
    .await;
    eprintln!(
        "figure: black-holed death -> same id alive again: {} ms",
        killed.elapsed().as_millis()
    );
    p.wait_http().await;
    c.procs[0] = Some(p);
    // the ended session leaves pg_stat_activity a moment after it let go of the lock
    wait_until(
        "the stale lock session to be ended",
        Duration::from_secs(10),
        || async {
            let left =
                c.db.scalar_i64(&format!(
                    "select count(*) from pg_stat_activity where pid = {stale_pid}"
                ))
                .await;
            (left == 0).then_some(())
        },
    )
    .await;
    c.wait_all_terminal(Duration::from_secs(60)).await;
    assert_eq!(
        finished_by(&c.db, &ids(&owned), "spool-1").await,
        owned.len() as i64,
        "the returning id replayed its runs"
    );
    let runs: Vec<(String, usize)> = owned.iter().map(|(id, _)| (id.clone(), 20)).collect();
    assert_eq!(late_attach_check(&c.base_url(0), &runs).await, (0, 0));
    figures(&c.db, "true").await.assert_clean();
}
