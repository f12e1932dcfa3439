//! Chaos: N `ledger_ticker` runs (a third with concurrency keys) across three executors while
//! they are SIGKILLed and restarted at random (seeded), then the figures. The short version runs
//! in `just test`; `just chaos` runs the long one (CHAOS_RUNS, CHAOS_KILLS, CHAOS_SEED).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::cluster::Cluster;
use crate::common::{wait_until, TestDb};
use crate::oracle::{figures, late_attach_check, Figures};

const TICKS: usize = 6;

pub struct ChaosReport {
    pub runs: usize,
    pub kills: usize,
    pub seed: u64,
    pub figures: Figures,
    pub recovery_ms: Vec<u128>,
    pub wall: Duration,
}

impl ChaosReport {
    fn percentile(&self, p: f64) -> u128 {
        let mut v = self.recovery_ms.clone();
        v.sort_unstable();
        if v.is_empty() {
            return 0;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    }

    pub fn print(&self) {
        let f = &self.figures;
        println!(
            "chaos: {} runs, {} kills, seed {}, {:.1} s",
            self.runs,
            self.kills,
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
        println!(
            "  recovery (kill -> runs re-claimed) p50 {} ms, p99 {} ms",
            self.percentile(0.5),
            self.percentile(0.99)
        );
    }
}

pub async fn run_chaos(runs: usize, kills: usize, seed: u64) -> ChaosReport {
    let started = Instant::now();
    let mut c = Cluster::start(TestDb::new().await, 3, &[]).await;
    c.db.exec(&format!(
        // max_attempts is raised: chaos kills are not the runs' fault (the crash-loop guard has
        // its own scenario), and random kills can hit one executor many times in a row
        "insert into spool.runs (id, workflow, max_attempts, concurrency_key, input)
         select 'c' || i, 'ledger_ticker', 1000,
                case when i % 3 = 0 then 'key-' || (i % 30) end,
                jsonb_build_object('count', {TICKS}, 'interval_ms', 20, 'steps', 3,
                                   'key', case when i % 3 = 0 then 'key-' || (i % 30) end)
           from generate_series(1, {runs}) i order by i"
    ))
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut recovery_ms = Vec::new();
    for k in 0..kills {
        // kills are spread over the progress of the work, not over time
        let target = ((k + 1) * runs / (kills + 2)) as i64;
        wait_until("progress before the next kill", Duration::from_secs(300), || async {
            (c.db.scalar_i64("select count(*) from spool.runs where status <> 'queued' and status <> 'running'").await >= target).then_some(())
        })
        .await;
        let victim = rng.random_range(0..3usize);
        let id = Cluster::id(victim);
        let owned: Vec<(String, i64)> = c
            .db
            .client()
            .await
            .query("select id, claim_epoch from spool.runs where executor_id = $1 and status = 'running'", &[&id])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let killed_at = Instant::now();
        c.kill(victim).await;
        c.restart(victim).await;
        // recovered: every run it owned was re-claimed (or finished)
        let ids: Vec<String> = owned.iter().map(|(id, _)| id.clone()).collect();
        let epochs: Vec<i64> = owned.iter().map(|(_, e)| *e).collect();
        wait_until("the killed executor's runs to be re-claimed", Duration::from_secs(60), || async {
            let pending = c
                .db
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
        if !owned.is_empty() {
            recovery_ms.push(killed_at.elapsed().as_millis());
        }
    }
    c.wait_all_terminal(Duration::from_secs(600)).await;
    let mut f = figures(&c.db, "true").await;
    let all: Vec<(String, usize)> = (1..=runs).map(|i| (format!("c{i}"), TICKS)).collect();
    let (duplicates, incomplete) = late_attach_check(&c.base_url(0), &all).await;
    f.duplicate_chunks = duplicates;
    f.incomplete_outputs = incomplete;
    ChaosReport {
        runs,
        kills,
        seed,
        figures: f,
        recovery_ms,
        wall: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_seeded_run_loses_nothing_and_duplicates_nothing() {
    let report = run_chaos(90, 6, 42).await;
    report.print();
    report.figures.assert_clean();
}

/// `just chaos`: the long run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; run with `just chaos`"]
async fn chaos_full() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let report = run_chaos(
        env("CHAOS_RUNS", 1000) as usize,
        env("CHAOS_KILLS", 50) as usize,
        env("CHAOS_SEED", 1),
    )
    .await;
    report.print();
    report.figures.assert_clean();
}
