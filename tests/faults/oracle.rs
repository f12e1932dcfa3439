//! The figures every fault scenario and `just chaos` check, computed from the oracle tables (the
//! steps' own ledger and the terminal-transition log), not from Spool's view of itself.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;

use crate::common::TestDb;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    /// Runs not finished (or not succeeded, for runs that should succeed).
    pub lost: i64,
    /// Runs with more than one terminal transition.
    pub completed_twice: i64,
    /// Step executions that started after the step's output had been memoized.
    pub memoized_reexecuted: i64,
    /// Step executions of a keyed run that came after a later run of the same key had started.
    pub key_violations: i64,
    /// Chunks a late attacher saw more than once, over all runs checked.
    pub duplicate_chunks: i64,
    /// Late attaches whose chunks were not exactly `tick-1..tick-N` in order (missing or
    /// reordered), over all runs checked.
    pub incomplete_outputs: i64,
}

impl Figures {
    pub fn assert_clean(&self) {
        assert_eq!(self, &Figures::default(), "fault figures must all be zero");
    }
}

/// Computes the database figures for the runs matching `filter` (an SQL condition on `r`).
pub async fn figures(db: &TestDb, filter: &str) -> Figures {
    for row in db
        .client()
        .await
        .query(
            &format!("select r.id, r.status, r.attempt, r.error::text from spool.runs r where ({filter}) and r.status <> 'succeeded' limit 5"),
            &[],
        )
        .await
        .unwrap()
    {
        let (id, status, attempt, error): (String, String, i32, Option<String>) = (row.get(0), row.get(1), row.get(2), row.get(3));
        eprintln!("not succeeded: {id} {status} attempt {attempt}: {}", error.unwrap_or_default());
        for l in db.client().await.query("select executor, attempt, step, executed_at::text from example_step_ledger where run_id = $1 order by id", &[&id]).await.unwrap() {
            let (e, a, st, at): (String, i32, i32, String) = (l.get(0), l.get(1), l.get(2), l.get(3));
            eprintln!("   ledger: {e} attempt {a} step {st} at {at}");
        }
        for l in db.client().await.query("select step, claim_epoch, finished_at::text from spool.operation_outputs where run_id = $1 order by step", &[&id]).await.unwrap() {
            let (st, ep, at): (i32, i64, String) = (l.get(0), l.get(1), l.get(2));
            eprintln!("   memo: step {st} epoch {ep} at {at}");
        }
    }
    let q = |sql: String| async move { db.scalar_i64(&sql).await };
    Figures {
        lost: q(format!("select count(*) from spool.runs r where ({filter}) and r.status <> 'succeeded'")).await,
        completed_twice: q(format!(
            "select count(*) from (select t.run_id from terminal_log t join spool.runs r on r.id = t.run_id
              where ({filter}) group by t.run_id having count(*) > 1) x"
        ))
        .await,
        memoized_reexecuted: q(format!(
            "select count(*) from example_step_ledger l
               join spool.operation_outputs o on o.run_id = l.run_id and o.step = l.step
               join spool.runs r on r.id = l.run_id
              where ({filter}) and l.executed_at > o.finished_at"
        ))
        .await,
        key_violations: q(format!(
            "select count(*) from (
                select r.enqueue_seq,
                       max(r.enqueue_seq) over (partition by l.key order by l.executed_at, l.id
                                                rows between unbounded preceding and 1 preceding) as before
                  from example_step_ledger l join spool.runs r on r.id = l.run_id
                 where l.key is not null and ({filter})) x
              where x.enqueue_seq < x.before"
        ))
        .await,
        duplicate_chunks: 0,
        incomplete_outputs: 0,
    }
}

/// Attaches late to each run; returns (duplicate chunks, outputs that were not exactly
/// `tick-1..tick-N` in order).
pub async fn late_attach_check(base: &str, runs: &[(String, usize)]) -> (i64, i64) {
    let mut duplicates = 0;
    let mut incomplete = 0;
    for (run_id, n) in runs {
        let events = spool::sse_client::attach(base, None, run_id, None)
            .await
            .expect("attach");
        let mut events = Box::pin(events);
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut order = Vec::new();
        let read = async {
            while let Some(Ok(e)) = events.next().await {
                if e.event == "chunk" {
                    *seen.entry(e.data.clone()).or_default() += 1;
                    order.push(e.data.clone());
                }
                if e.is_end() {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("late attach ends");
        let expected: Vec<String> = (1..=*n).map(|i| format!("tick-{i}")).collect();
        let extra: usize = seen.values().map(|c| c.saturating_sub(1)).sum();
        duplicates += extra as i64;
        if extra == 0 && order != expected {
            incomplete += 1;
        }
    }
    (duplicates, incomplete)
}
