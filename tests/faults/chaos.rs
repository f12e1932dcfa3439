//! Chaos: N `ledger_ticker` runs (a third with concurrency keys) across three executors while
//! faults hit them at random (seeded), then the figures, per fault kind. The kinds: SIGKILL and
//! restart; a black-holed node killed (no FIN) and replaced; a frozen node stopped with SIGTERM;
//! a partition that heals after the takeover; a scale-down (killed, adopted by the others, then
//! scaled back up); a rolling restart of all three with stable ids. Every executor reaches
//! Postgres and NATS through relays of its own. The short version (kills only) runs in
//! `just test`; `just chaos` runs the long one (CHAOS_RUNS, CHAOS_FAULTS, CHAOS_SEED,
//! CHAOS_KINDS).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use spool::sse_client::{self, SseEvent};

use crate::cluster::Cluster;
use crate::common::{wait_until, TestDb};
use crate::node_death::{adoption_deadline, db_now, owned_running, wait_adopted, LEASE_ENV};
use crate::oracle::{figures, late_attach_check, Figures};

const TICKS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    Kill,
    BlackHoleKill,
    Freeze,
    PartitionHeal,
    ScaleDown,
    RollingRestart,
}

impl FaultKind {
    const ALL: [FaultKind; 6] = [
        FaultKind::Kill,
        FaultKind::BlackHoleKill,
        FaultKind::Freeze,
        FaultKind::PartitionHeal,
        FaultKind::ScaleDown,
        FaultKind::RollingRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::BlackHoleKill => "black-hole-kill",
            FaultKind::Freeze => "freeze",
            FaultKind::PartitionHeal => "partition-heal",
            FaultKind::ScaleDown => "scale-down",
            FaultKind::RollingRestart => "rolling-restart",
        }
    }

    /// `all`, or names separated by commas.
    pub fn parse_list(list: &str) -> Vec<FaultKind> {
        if list.trim() == "all" {
            return Self::ALL.to_vec();
        }
        list.split(',')
            .map(|n| {
                Self::ALL
                    .into_iter()
                    .find(|k| k.name() == n.trim())
                    .unwrap_or_else(|| panic!("unknown fault kind {n:?}"))
            })
            .collect()
    }

    /// Whether the victim's runs must go to another executor (takeover) rather than back to
    /// the same id.
    fn takes_over(self) -> bool {
        matches!(
            self,
            FaultKind::BlackHoleKill
                | FaultKind::Freeze
                | FaultKind::PartitionHeal
                | FaultKind::ScaleDown
        )
    }
}

/// The figures of the runs one kind of fault hit.
pub struct KindReport {
    pub kind: FaultKind,
    pub faults: usize,
    pub runs_hit: usize,
    pub figures: Figures,
    /// Step records accepted from a claim epoch the takeover had ended, after the takeover.
    pub zombie_writes: i64,
    /// Fault -> the victim's runs re-claimed (by the same id or, for takeovers, another one).
    pub reclaimed_ms: Vec<u128>,
    /// Fault -> the first chunk after the `reset` an attacher of a victim's run saw.
    pub first_chunk_ms: Vec<u128>,
}

pub struct ChaosReport {
    pub runs: usize,
    pub faults: usize,
    pub seed: u64,
    pub figures: Figures,
    pub per_kind: Vec<KindReport>,
    pub wall: Duration,
}

fn percentile(v: &[u128], p: f64) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize].to_string()
}

impl ChaosReport {
    pub fn print(&self) {
        let f = &self.figures;
        println!(
            "chaos: {} runs, {} faults, seed {}, {:.1} s",
            self.runs,
            self.faults,
            self.seed,
            self.wall.as_secs_f64()
        );
        println!("  runs lost                          {}", f.lost);
        println!("  runs completed twice               {}", f.completed_twice);
        println!(
            "  memoized steps executed again      {}",
            f.memoized_reexecuted
        );
        println!("  per-key overlaps or inversions     {}", f.key_violations);
        println!(
            "  duplicate chunks (late attachers)  {}",
            f.duplicate_chunks
        );
        println!(
            "  outputs not whole (late attachers) {}",
            f.incomplete_outputs
        );
        println!("  per fault kind (figures over the runs the victim owned at the fault; ms):");
        println!(
            "  {:<16} {:>6} {:>5} {:>5} {:>6} {:>6} {:>5} {:>5} {:>5} {:>7} {:>12} {:>12}",
            "kind",
            "faults",
            "runs",
            "lost",
            "twice",
            "memo",
            "key",
            "dup",
            "gaps",
            "zombie",
            "reclaim p50/99",
            "1st chunk p50/99"
        );
        for k in &self.per_kind {
            let f = &k.figures;
            println!(
                "  {:<16} {:>6} {:>5} {:>5} {:>6} {:>6} {:>5} {:>5} {:>5} {:>7} {:>6}/{:<6} {:>6}/{:<6}",
                k.kind.name(),
                k.faults,
                k.runs_hit,
                f.lost,
                f.completed_twice,
                f.memoized_reexecuted,
                f.key_violations,
                f.duplicate_chunks,
                f.incomplete_outputs,
                k.zombie_writes,
                percentile(&k.reclaimed_ms, 0.5),
                percentile(&k.reclaimed_ms, 0.99),
                percentile(&k.first_chunk_ms, 0.5),
                percentile(&k.first_chunk_ms, 0.99),
            );
        }
    }

    pub fn assert_clean(&self) {
        self.figures.assert_clean();
        for k in &self.per_kind {
            assert_eq!(k.figures, Figures::default(), "{} figures", k.kind.name());
            assert_eq!(k.zombie_writes, 0, "{} zombie writes", k.kind.name());
        }
    }
}

/// An attacher of one of the victim's runs, opened on a survivor before the fault.
struct Watcher {
    kind: FaultKind,
    fault_at: Instant,
    events: tokio::task::JoinHandle<Vec<(Instant, SseEvent)>>,
}

async fn watch(
    base: String,
    run_id: &str,
) -> Option<tokio::task::JoinHandle<Vec<(Instant, SseEvent)>>> {
    let events = sse_client::attach(&base, None, run_id, None).await.ok()?;
    Some(tokio::spawn(async move {
        let mut events = Box::pin(events);
        let mut seen = Vec::new();
        let read = async {
            while let Some(Ok(e)) = events.next().await {
                let end = e.is_end();
                seen.push((Instant::now(), e));
                if end {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(120), read).await;
        seen
    }))
}

/// Waits until every run of `owned` was claimed again (a new epoch) or finished.
async fn wait_reclaimed(db: &TestDb, owned: &[(String, i64)]) {
    let ids: Vec<String> = owned.iter().map(|(id, _)| id.clone()).collect();
    let epochs: Vec<i64> = owned.iter().map(|(_, e)| *e).collect();
    wait_until("the victim's runs to be re-claimed", Duration::from_secs(60), || async {
        let pending = db
            .client()
            .await
            .query_one(
                "select count(*) from spool.runs r join unnest($1::text[], $2::int8[]) o(id, epoch) on o.id = r.id
                  where r.status = 'running' and r.claim_epoch = o.epoch",
                &[&ids, &epochs],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        (pending == 0).then_some(())
    })
    .await;
}

/// Records that `owned` runs were taken from their owner at `takeover`: writes of their old
/// epochs after it are zombie writes.
async fn record_takeover(db: &TestDb, owned: &[(String, i64)]) {
    let at = db_now(db).await;
    let ids: Vec<String> = owned.iter().map(|(id, _)| id.clone()).collect();
    let epochs: Vec<i64> = owned.iter().map(|(_, e)| *e).collect();
    db.client()
        .await
        .execute(
            "insert into chaos_takeovers (run_id, old_epoch, takeover)
             select id, epoch, $3 from unnest($1::text[], $2::int8[]) o(id, epoch)",
            &[&ids, &epochs, &at],
        )
        .await
        .unwrap();
}

/// Inserts chaos runs `c{from}..=c{to}` (a third with concurrency keys).
async fn insert_chaos_runs(db: &TestDb, from: usize, to: usize) {
    if from > to {
        return;
    }
    db.exec(&format!(
        // max_attempts is raised: chaos kills are not the runs' fault (the crash-loop guard has
        // its own scenario), and random kills can hit one executor many times in a row
        "insert into spool.runs (id, workflow, max_attempts, concurrency_key, input)
         select 'c' || i, 'ledger_ticker', 1000,
                case when i % 3 = 0 then 'key-' || (i % 30) end,
                jsonb_build_object('count', {TICKS}, 'interval_ms', 20, 'steps', 3,
                                   'key', case when i % 3 = 0 then 'key-' || (i % 30) end)
           from generate_series({from}, {to}) i order by i"
    ))
    .await;
}

/// Applies one fault to `victim` and brings the cluster back to three live executors.
async fn apply(c: &mut Cluster, kind: FaultKind, victim: usize, owned: &[(String, i64)]) {
    let id = Cluster::id(victim);
    match kind {
        FaultKind::Kill => {
            c.kill(victim).await;
            c.restart(victim).await;
            wait_reclaimed(&c.db, owned).await;
        }
        FaultKind::BlackHoleKill | FaultKind::ScaleDown => {
            if kind == FaultKind::BlackHoleKill {
                c.relays(victim).black_hole();
            }
            c.kill(victim).await;
            wait_adopted(&c.db, owned, &id, adoption_deadline()).await;
            record_takeover(&c.db, owned).await;
            // a replacement host (or the scale-up that follows the scale-down)
            c.restart(victim).await;
        }
        FaultKind::Freeze => {
            c.relays(victim).freeze();
            wait_adopted(&c.db, owned, &id, adoption_deadline()).await;
            record_takeover(&c.db, owned).await;
            let mut p = c.procs[victim].take().unwrap();
            p.signal(Signal::SIGTERM);
            p.wait_exit(Duration::from_secs(15)).await;
            c.restart(victim).await;
        }
        FaultKind::PartitionHeal => {
            c.relays(victim).black_hole();
            wait_adopted(&c.db, owned, &id, adoption_deadline()).await;
            record_takeover(&c.db, owned).await;
            let healed = db_now(&c.db).await;
            c.relays(victim).heal();
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let renewed =
                    c.db.client()
                        .await
                        .query_one(
                            "select heartbeat_at > $1 from spool.executors where id = $2",
                            &[&healed, &id],
                        )
                        .await
                        .unwrap()
                        .get::<_, bool>(0);
                let exited = c.procs[victim].as_mut().unwrap().try_exited();
                if exited {
                    c.procs[victim] = None;
                    c.restart(victim).await;
                    break;
                }
                if renewed {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "{id} neither renewed nor exited after the partition healed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await; // poll interval of a deadline wait
            }
        }
        FaultKind::RollingRestart => {
            for i in 0..3 {
                let mut old = c.procs[i].take().unwrap();
                old.signal(Signal::SIGTERM);
                let new = c.spawn(i, &[("SPOOL_LOCK_WAIT_MS", "30000")]).await;
                assert!(old.wait_exit(Duration::from_secs(30)).await.success());
                new.wait_alive(&c.db).await;
                new.wait_http().await;
                c.procs[i] = Some(new);
            }
            wait_reclaimed(&c.db, owned).await;
        }
    }
}

pub async fn run_chaos(runs: usize, faults: usize, seed: u64, kinds: &[FaultKind]) -> ChaosReport {
    let started = Instant::now();
    let only_kills = kinds.iter().all(|k| *k == FaultKind::Kill);
    let mut c = if only_kills {
        Cluster::start(TestDb::new().await, 3, &[]).await
    } else {
        Cluster::start_relayed(TestDb::new().await, 3, LEASE_ENV).await
    };
    c.db.exec(
        "create table chaos_fault_runs (kind text not null, run_id text not null);
         create table chaos_takeovers (run_id text not null, old_epoch bigint not null,
                                       takeover timestamptz not null);",
    )
    .await;
    // Kills alone are paced by progress over runs inserted at once. Faults that take seconds
    // (leases, takeovers) would outlast that work, so then the runs come in a wave per fault and
    // each fault waits until its victim has work.
    let waves = if only_kills { 1 } else { faults + 1 };
    let wave = runs.div_ceil(waves);
    insert_chaos_runs(&c.db, 1, wave.min(runs)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut watchers = Vec::new();
    let mut reclaimed: Vec<(FaultKind, u128)> = Vec::new();
    let mut counts: Vec<(FaultKind, usize)> = Vec::new();
    for k in 0..faults {
        // faults are spread over the progress of the work, not over time
        let target = ((k + 1) * runs / (faults + 2)) as i64;
        wait_until("progress before the next fault", Duration::from_secs(300), || async {
            (c.db.scalar_i64("select count(*) from spool.runs where status <> 'queued' and status <> 'running'").await >= target).then_some(())
        })
        .await;
        let kind = kinds[rng.random_range(0..kinds.len())];
        let victim = if kind == FaultKind::RollingRestart {
            0
        } else {
            rng.random_range(0..3usize)
        };
        if !only_kills {
            insert_chaos_runs(&c.db, (k + 1) * wave + 1, ((k + 2) * wave).min(runs)).await;
            let id = Cluster::id(victim);
            let has_work = async {
                while owned_running(&c.db, &id).await.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a deadline wait
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), has_work).await;
        }
        let mut owned = Vec::new();
        let victims: Vec<usize> = if kind == FaultKind::RollingRestart {
            vec![0, 1, 2]
        } else {
            vec![victim]
        };
        for v in victims {
            owned.extend(owned_running(&c.db, &Cluster::id(v)).await);
        }
        let ids: Vec<String> = owned.iter().map(|(id, _)| id.clone()).collect();
        c.db.client()
            .await
            .execute(
                "insert into chaos_fault_runs (kind, run_id) select $1, unnest($2::text[])",
                &[&kind.name(), &ids],
            )
            .await
            .unwrap();
        // an attacher of one of the victim's runs, on the executor restarted last (or never)
        let survivor = if kind == FaultKind::RollingRestart {
            2
        } else {
            (victim + 1) % 3
        };
        let watcher = match owned.first() {
            Some((run, _)) => watch(c.base_url(survivor), run).await,
            None => None,
        };
        eprintln!(
            "fault {k}: {} on {} ({} runs)",
            kind.name(),
            Cluster::id(victim),
            owned.len()
        );
        let fault_at = Instant::now();
        apply(&mut c, kind, victim, &owned).await;
        if !owned.is_empty() {
            reclaimed.push((kind, fault_at.elapsed().as_millis()));
        }
        counts.push((kind, 1));
        if let Some(events) = watcher {
            watchers.push(Watcher {
                kind,
                fault_at,
                events,
            });
        }
    }
    c.wait_all_terminal(Duration::from_secs(600)).await;
    let mut first_chunk: Vec<(FaultKind, u128)> = Vec::new();
    for w in watchers {
        let Ok(Ok(events)) = tokio::time::timeout(Duration::from_secs(120), w.events).await else {
            continue;
        };
        let first = events
            .iter()
            .skip_while(|(_, e)| e.event != "reset")
            .find(|(t, e)| e.event == "chunk" && *t >= w.fault_at);
        if let Some((t, _)) = first {
            first_chunk.push((w.kind, t.duration_since(w.fault_at).as_millis()));
        }
    }
    let mut f = figures(&c.db, "true").await;
    let all: Vec<(String, usize)> = (1..=runs).map(|i| (format!("c{i}"), TICKS)).collect();
    let (duplicates, incomplete) = late_attach_check(&c.base_url(0), &all).await;
    f.duplicate_chunks = duplicates;
    f.incomplete_outputs = incomplete;
    let used: BTreeSet<FaultKind> = counts.iter().map(|(k, _)| *k).collect();
    let mut per_kind = Vec::new();
    for kind in used {
        let filter = format!(
            "r.id in (select run_id from chaos_fault_runs where kind = '{}')",
            kind.name()
        );
        let mut kf = figures(&c.db, &filter).await;
        let hit: Vec<(String, usize)> =
            c.db.client()
                .await
                .query(
                    "select distinct run_id from chaos_fault_runs where kind = $1",
                    &[&kind.name()],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), TICKS))
                .collect();
        let (d, i) = late_attach_check(&c.base_url(0), &hit).await;
        kf.duplicate_chunks = d;
        kf.incomplete_outputs = i;
        let zombie_writes = if kind.takes_over() {
            c.db.scalar_i64(&format!(
                "select count(*) from spool.operation_outputs o
                   join chaos_takeovers t on t.run_id = o.run_id
                  where o.claim_epoch <= t.old_epoch and o.finished_at > t.takeover
                    and o.run_id in (select run_id from chaos_fault_runs where kind = '{}')",
                kind.name()
            ))
            .await
        } else {
            0
        };
        per_kind.push(KindReport {
            kind,
            faults: counts.iter().filter(|(k, _)| *k == kind).count(),
            runs_hit: hit.len(),
            figures: kf,
            zombie_writes,
            reclaimed_ms: reclaimed
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, v)| *v)
                .collect(),
            first_chunk_ms: first_chunk
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, v)| *v)
                .collect(),
        });
    }
    ChaosReport {
        runs,
        faults,
        seed,
        figures: f,
        per_kind,
        wall: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_seeded_run_loses_nothing_and_duplicates_nothing() {
    let report = run_chaos(90, 6, 42, &[FaultKind::Kill]).await;
    report.print();
    report.assert_clean();
}

/// `just chaos`: the long run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; run with `just chaos`"]
async fn chaos_full() {
    // `just chaos 1000 50 1 all` and `just chaos runs=1000 faults=50 …` both reach here: a
    // recipe argument written `name=value` arrives whole, so the name is dropped
    let arg = |k: &str| {
        std::env::var(k)
            .ok()
            .map(|v| v.rsplit('=').next().unwrap_or_default().to_string())
    };
    let env = |k: &str, d: u64| {
        arg(k)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{k}: not a number: {v:?}"))
            })
            .unwrap_or(d)
    };
    let kinds = FaultKind::parse_list(&arg("CHAOS_KINDS").unwrap_or_else(|| "all".into()));
    let report = run_chaos(
        env("CHAOS_RUNS", 1000) as usize,
        env("CHAOS_FAULTS", 50) as usize,
        env("CHAOS_SEED", 1),
        &kinds,
    )
    .await;
    report.print();
    report.assert_clean();
}
