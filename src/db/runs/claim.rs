//! The claim and the other ways a run changes owner: the one-statement claim, the key sweep,
//! adoption of dead executors' runs, and an executor taking back the runs it owns.

use super::{Run, RUN_COLUMNS};
use crate::db::{Conn, DbError};

/// The executor incarnation a claim is made for; a claim for a superseded incarnation claims
/// nothing.
#[derive(Debug, Clone)]
pub struct Claimant<'a> {
    pub executor_id: &'a str,
    pub incarnation: i64,
    pub workflows: &'a [String],
    /// `None` serves every queue.
    pub queues: Option<&'a [String]>,
}

/// Claims up to `limit` runnable runs in one statement.
///
/// A run is runnable when it is queued and ready (`key_ready`: a keyed run waiting behind
/// another run of its key is not in the claim index at all, so deep keys cost a claim nothing),
/// its `run_at` has come, and this executor knows its workflow. A keyed run must also be the
/// earliest *ready* run of its (queue, key) in the statement's snapshot, and its key must have
/// no running run. (A waiting run with a lower `enqueue_seq` is one whose insert committed late:
/// it runs after the ready one, when that one's end makes it ready.) Both checks are scalar
/// subqueries, so each is one probe of a small index per candidate (`runs_one_running_per_key`,
/// `runs_key_head_idx`) whatever the statistics say. The database itself guarantees the last rule
/// (`runs_one_running_per_key`): when inserts commit out of order and two claimers race for one
/// key, the loser's statement fails on that index and is retried with a fresh snapshot, which
/// skips the key.
///
/// Candidates are read one priority at a time, lowest first: for each distinct priority of
/// ready runs (found by a loose scan of the claim index), the index range of that priority whose
/// `run_at` has come, in (run_at, enqueue_seq) order. With a single scan over (priority, run_at,
/// enqueue_seq), `run_at <= now()` bounded nothing past the first priority, so a claim that found
/// fewer runs than it asked for walked every scheduled run of the queue.
///
/// The update finds the locked candidates by their tuple ids (a TID scan), not by id: each
/// candidate is locked by this statement, so its tuple id is its current version. By id, the
/// primary key was probed once per run and each heap row was checked against the whole array
/// of ids.
pub async fn claim(
    client: &impl Conn,
    who: &Claimant<'_>,
    limit: i64,
) -> Result<Vec<Run>, DbError> {
    let mut tries = 0;
    loop {
        match claim_once(client, who, limit).await {
            Err(DbError::Constraint { constraint, .. })
                if constraint == "runs_one_running_per_key" && tries < 5 =>
            {
                tries += 1;
                tracing::debug!("a claim raced another for one concurrency key; claiming again");
            }
            other => return other,
        }
    }
}

async fn claim_once(
    client: &impl Conn,
    who: &Claimant<'_>,
    limit: i64,
) -> Result<Vec<Run>, DbError> {
    let stmt = client.stmt(&claim_sql()).await.map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(
            &stmt,
            &[
                &who.executor_id,
                &who.incarnation,
                &who.workflows,
                &who.queues,
                &limit,
            ],
        )
        .await
        .map_err(DbError::from_pg)?;
    let mut runs: Vec<Run> = rows.iter().map(Run::from_row).collect();
    runs.sort_by_key(|r| (r.priority, r.run_at, r.enqueue_seq));
    Ok(runs)
}

/// The statement of [`claim`] (public for the tests of its plan): parameters executor id,
/// incarnation, workflows, queues (null: all), limit.
///
/// The update joins the locked candidates' tuple ids through `spool.each_tid`, which declares
/// one row, so the plan reaches each claimed row by a TID scan in a nested loop. With
/// `ctid = any(array)`, or a join on an unnest of the array, a generic plan made while the queue
/// was empty (an idle executor's polls) chose a sequential scan, and PostgreSQL keeps that plan
/// until the next ANALYZE: a backlog that arrived since was scanned whole on every claim.
pub fn claim_sql() -> String {
    format!(
        "with recursive owner as (
            select 1 from spool.executors e
             where e.id = $1 and e.incarnation = $2 and e.stopped_at is null
             for share
         ), priorities as (
            -- the distinct priorities of ready runs, one index descent each (a loose scan)
            (select r.priority from spool.runs r
              where r.status = 'queued' and r.key_ready
              order by r.priority limit 1)
            union all
            select (select r.priority from spool.runs r
                     where r.status = 'queued' and r.key_ready and r.priority > p.priority
                     order by r.priority limit 1)
              from priorities p
             where p.priority is not null
         ), candidates as (
            select c.tid from priorities p cross join lateral (
                select r.ctid as tid from spool.runs r
                 where r.status = 'queued'
                   and r.key_ready
                   and r.priority = p.priority
                   and r.run_at <= now()
                   and r.attempt < 1000000 and r.claim_epoch < 1000000000000000
                   and r.workflow = any($3)
                   and ($4::text[] is null or r.queue = any($4))
                   and (r.concurrency_key is null or (
                            (select 1 from spool.runs k
                              where k.queue = r.queue and k.concurrency_key = r.concurrency_key
                                and k.concurrency_key is not null and k.status = 'running'
                              limit 1) is null
                            and (select 1 from spool.runs k
                                  where k.queue = r.queue and k.concurrency_key = r.concurrency_key
                                    and k.concurrency_key is not null and k.status = 'queued'
                                    and k.key_ready and k.enqueue_seq < r.enqueue_seq
                                  limit 1) is null))
                   and exists (select 1 from owner)
                 order by r.run_at, r.enqueue_seq
                 limit $5
                 for update of r skip locked
            ) c
             where p.priority is not null
             limit $5
         )
         update spool.runs r
            set status = 'running',
                executor_id = $1,
                incarnation = $2,
                claim_epoch = r.claim_epoch + 1,
                attempt = r.attempt + 1,
                started_at = coalesce(r.started_at, now()),
                updated_at = now()
           from spool.each_tid(array(select tid from candidates)) as c(tid)
          where r.ctid = c.tid
         returning {RUN_COLUMNS}"
    )
}

/// Makes ready the head of every key whose waiting runs have no ready or running run (see
/// `spool.promote_waiting_keys`). Returns how many runs became ready.
pub async fn promote_waiting_keys(client: &impl Conn) -> Result<i64, DbError> {
    let stmt = client
        .stmt("select spool.promote_waiting_keys()")
        .await
        .map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(&stmt, &[])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.get(0))
}

/// Hands the runs of executors dead past their takeover delay back to the queue with a new
/// claim epoch (see `spool.adopt_orphaned_runs`); the ordinary claim then takes them. Returns the
/// adopted run ids.
pub async fn adopt_orphaned_runs(client: &impl Conn, limit: i32) -> Result<Vec<String>, DbError> {
    let stmt = client
        .stmt("select spool.adopt_orphaned_runs($1)")
        .await
        .map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(&stmt, &[&limit])
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A run taken back by [`reclaim_owned`], and whether this re-claim counted an attempt against
/// it.
#[derive(Debug, Clone)]
pub struct Reclaimed {
    pub run: Run,
    /// The run was executing when an earlier incarnation died and could have caused it.
    pub blamed: bool,
}

/// Takes back the runs this executor owns but is not executing: those left by an earlier
/// incarnation (a crash), or claimed by this one and then lost track of (a claim whose reply
/// never arrived). Each gets a new claim epoch.
///
/// An attempt is counted only against runs that could have caused a crash: if the incarnation
/// that owned them was isolating suspects, the runs on probation; otherwise the runs that
/// recorded no step since their last claim. A run lost track of by this incarnation is not
/// blamed at all. The executors row is read `for share`, so a reclaim by a superseded
/// incarnation serializes against its successor's registration and takes nothing.
pub async fn reclaim_owned(
    client: &impl Conn,
    executor_id: &str,
    incarnation: i64,
    in_flight: &[String],
) -> Result<Vec<Reclaimed>, DbError> {
    let sql = format!(
        "with me as (
            select e.probation_runs, e.probation_incarnation from spool.executors e
             where e.id = $1 and e.incarnation = $2 and e.stopped_at is null
             for share
         ), b as (
            select r.id,
                   case
                       when r.incarnation = $2 then false
                       when m.probation_incarnation = r.incarnation
                            and cardinality(m.probation_runs) > 0
                           then r.id = any(m.probation_runs)
                       else not exists (select 1 from spool.operation_outputs o
                                         where o.run_id = r.id and o.claim_epoch = r.claim_epoch)
                   end as blamed
              from spool.runs r, me m
             where r.executor_id = $1
               and r.status = 'running'
               and not (r.id = any($3))
               and r.attempt < 1000000 and r.claim_epoch < 1000000000000000
         )
         update spool.runs r
            set claim_epoch = r.claim_epoch + 1,
                attempt = r.attempt + b.blamed::int,
                incarnation = $2,
                updated_at = now()
           from b
          where r.id = b.id and r.executor_id = $1 and r.status = 'running'
         returning b.blamed, {RUN_COLUMNS}"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(&stmt, &[&executor_id, &incarnation, &in_flight])
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows
        .iter()
        .map(|row| Reclaimed {
            blamed: row.get(0),
            run: Run::from_row_offset(row, 1),
        })
        .collect())
}
