//! SQL for `spool.runs`: enqueue, read, the claim, and every fenced transition of a claimed run.
//!
//! The claim is one statement. Every later transition is a compare-and-set on (id, claim_epoch,
//! status = 'running') and returns [`DbError::Lost`] when it affects zero rows.

use super::Conn;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;

use super::{claimer_is_current, DbError};

/// Run columns in the order [`Run::from_row`] reads them.
const RUN_COLUMNS: &str = "r.id, r.workflow, r.input, r.queue, r.concurrency_key, r.priority, \
     r.run_at, r.status, r.executor_id, r.attempt, r.max_attempts, r.claim_epoch, \
     r.cancel_requested, r.output, r.error, r.created_at, r.started_at, r.finished_at, \
     r.updated_at, r.enqueue_seq";

/// One row of `spool.runs`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Run {
    pub id: String,
    pub workflow: String,
    pub input: Value,
    pub queue: String,
    pub concurrency_key: Option<String>,
    pub priority: i32,
    pub run_at: DateTime<Utc>,
    pub status: String,
    pub executor_id: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub claim_epoch: i64,
    pub cancel_requested: bool,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub enqueue_seq: i64,
}

impl Run {
    fn from_row(row: &Row) -> Self {
        Self::from_row_offset(row, 0)
    }

    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }
}

pub fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled" | "dead")
}

/// What an enqueuer asks for. `None` fields take the column defaults.
#[derive(Debug, Clone, Default)]
pub struct NewRun {
    pub id: Option<String>,
    pub workflow: String,
    pub input: Value,
    pub queue: Option<String>,
    pub concurrency_key: Option<String>,
    pub priority: Option<i32>,
    pub max_attempts: Option<i32>,
    /// Delay from the database's `now()`, in milliseconds.
    pub delay_ms: Option<i64>,
    pub run_at: Option<DateTime<Utc>>,
}

/// Inserts a run. Returns `(run, true)` when created, `(existing, false)` when the id existed.
pub async fn insert_run(client: &impl Conn, new: &NewRun) -> Result<(Run, bool), DbError> {
    let sql = format!(
        "with ins as (
            insert into spool.runs as r (id, workflow, input, queue, concurrency_key, priority,
                                         max_attempts, run_at)
            values (coalesce($1, gen_random_uuid()::text), $2, $3, coalesce($4, 'default'), $5,
                    coalesce($6, 0), coalesce($7, 5),
                    coalesce($8::timestamptz, now() + make_interval(secs => coalesce($9::int8, 0)::float8 / 1000)))
            on conflict (id) do nothing
            returning {RUN_COLUMNS}
         )
         select true, * from ins
         union all
         select false, {RUN_COLUMNS} from spool.runs r
          where r.id = $1 and not exists (select 1 from ins)"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_one(
            &stmt,
            &[
                &new.id,
                &new.workflow,
                &new.input,
                &new.queue,
                &new.concurrency_key,
                &new.priority,
                &new.max_attempts,
                &new.run_at,
                &new.delay_ms,
            ],
        )
        .await
        .map_err(DbError::from_pg)?;
    let created: bool = row.get(0);
    // skip the leading flag column
    let run = Run::from_row_offset(&row, 1);
    Ok((run, created))
}

impl Run {
    fn from_row_offset(row: &Row, offset: usize) -> Self {
        let g = |i: usize| i + offset;
        Self {
            id: row.get(g(0)),
            workflow: row.get(g(1)),
            input: row.get(g(2)),
            queue: row.get(g(3)),
            concurrency_key: row.get(g(4)),
            priority: row.get(g(5)),
            run_at: row.get(g(6)),
            status: row.get(g(7)),
            executor_id: row.get(g(8)),
            attempt: row.get(g(9)),
            max_attempts: row.get(g(10)),
            claim_epoch: row.get(g(11)),
            cancel_requested: row.get(g(12)),
            output: row.get(g(13)),
            error: row.get(g(14)),
            created_at: row.get(g(15)),
            started_at: row.get(g(16)),
            finished_at: row.get(g(17)),
            updated_at: row.get(g(18)),
            enqueue_seq: row.get(g(19)),
        }
    }
}

pub async fn get_run(client: &impl Conn, id: &str) -> Result<Option<Run>, DbError> {
    let sql = format!("select {RUN_COLUMNS} from spool.runs r where r.id = $1");
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let row = client
        .pg()
        .query_opt(&stmt, &[&id])
        .await
        .map_err(DbError::from_pg)?;
    Ok(row.as_ref().map(Run::from_row))
}

/// Filters for [`list_runs`]; `before_seq` is the cursor (exclusive), newest first.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub status: Option<String>,
    pub workflow: Option<String>,
    pub queue: Option<String>,
    pub concurrency_key: Option<String>,
    pub before_seq: Option<i64>,
    pub limit: i64,
}

pub async fn list_runs(client: &impl Conn, f: &RunFilter) -> Result<Vec<Run>, DbError> {
    let sql = format!(
        "select {RUN_COLUMNS} from spool.runs r
          where ($1::text is null or r.status = $1)
            and ($2::text is null or r.workflow = $2)
            and ($3::text is null or r.queue = $3)
            and ($4::text is null or r.concurrency_key = $4)
            and ($5::int8 is null or r.enqueue_seq < $5)
          order by r.enqueue_seq desc
          limit $6"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(
            &stmt,
            &[
                &f.status,
                &f.workflow,
                &f.queue,
                &f.concurrency_key,
                &f.before_seq,
                &f.limit,
            ],
        )
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows.iter().map(Run::from_row).collect())
}

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
/// A run is runnable when it is queued, its `run_at` has come, this executor knows its workflow,
/// and — when it has a concurrency key — no earlier unfinished run with the same (queue, key)
/// exists. That last rule looks at queued *and* running runs in the statement's snapshot, so a
/// head that another claimer has locked (and SKIP LOCKED skips) still blocks its successors:
/// the claim never slides past a locked head of a key.
pub async fn claim(
    client: &impl Conn,
    who: &Claimant<'_>,
    limit: i64,
) -> Result<Vec<Run>, DbError> {
    let sql = format!(
        "with owner as (
            select 1 from spool.executors e
             where e.id = $1 and e.incarnation = $2 and e.stopped_at is null
             for share
         ), candidates as (
            select r.id from spool.runs r
             where r.status = 'queued'
               and r.run_at <= now()
               and r.workflow = any($3)
               and ($4::text[] is null or r.queue = any($4))
               and (r.concurrency_key is null or not exists (
                        select 1 from spool.runs k
                         where k.queue = r.queue
                           and k.concurrency_key = r.concurrency_key
                           and k.status in ('queued', 'running')
                           and k.enqueue_seq < r.enqueue_seq))
               and exists (select 1 from owner)
             order by r.priority, r.run_at, r.enqueue_seq
             limit $5
             for update of r skip locked
         )
         update spool.runs r
            set status = 'running',
                executor_id = $1,
                incarnation = $2,
                claim_epoch = r.claim_epoch + 1,
                attempt = r.attempt + 1,
                started_at = coalesce(r.started_at, now()),
                updated_at = now()
          where r.id = any(array(select id from candidates))
         returning {RUN_COLUMNS}"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
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

/// Takes back the runs this executor owns but is not executing: those left by an earlier
/// incarnation (a crash), or claimed by this one and then lost track of (a claim whose reply
/// never arrived). Each gets a new claim epoch and counts an attempt.
pub async fn reclaim_owned(
    client: &impl Conn,
    executor_id: &str,
    incarnation: i64,
    in_flight: &[String],
) -> Result<Vec<Run>, DbError> {
    let sql = format!(
        "update spool.runs r
            set claim_epoch = r.claim_epoch + 1,
                attempt = r.attempt + 1,
                incarnation = $2,
                updated_at = now()
          where r.executor_id = $1
            and r.status = 'running'
            and not (r.id = any($3))
            and exists (select 1 from spool.executors e
                         where e.id = $1 and e.incarnation = $2 and e.stopped_at is null)
         returning {RUN_COLUMNS}"
    );
    let stmt = client.stmt(&sql).await.map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(&stmt, &[&executor_id, &incarnation, &in_flight])
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows.iter().map(Run::from_row).collect())
}

/// The terminal statuses an executor may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    Dead,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Dead => "dead",
        }
    }
}

/// Ends a run the caller owns at `claim_epoch`: its one terminal transition.
pub async fn finish_if_owned(
    client: &impl Conn,
    id: &str,
    claim_epoch: i64,
    outcome: Outcome,
    output: Option<&Value>,
    error: Option<&Value>,
) -> Result<(), DbError> {
    let stmt = client
        .stmt(concat!(
            "update spool.runs r
                set status = $3, output = $4, error = $5, finished_at = now(), updated_at = now()
              where id = $1 and claim_epoch = $2 and status = 'running'
                and ",
            claimer_is_current!()
        ))
        .await
        .map_err(DbError::from_pg)?;
    let n = client
        .pg()
        .execute(
            &stmt,
            &[&id, &claim_epoch, &outcome.as_str(), &output, &error],
        )
        .await
        .map_err(DbError::from_pg)?;
    if n == 0 {
        return Err(DbError::Lost(id.to_string()));
    }
    Ok(())
}

/// Hands a run back to the queue (graceful shutdown): queued, no owner, so any executor continues
/// it from its last memoized step. The attempt is given back: a release is not a crash. The
/// release wakes idle executors (the same NOTIFY as an insert), so a survivor takes the run at
/// once instead of at its next poll.
pub async fn release_if_owned(
    client: &impl Conn,
    id: &str,
    claim_epoch: i64,
) -> Result<(), DbError> {
    let stmt = client
        .stmt(concat!(
            "with released as (
                update spool.runs r
                   set status = 'queued', executor_id = null, incarnation = null,
                       attempt = greatest(attempt - 1, 0), updated_at = now()
                 where id = $1 and claim_epoch = $2 and status = 'running'
                   and ",
            claimer_is_current!(),
            "
                returning 1
             )
             select pg_notify('spool_runs', '') from released"
        ))
        .await
        .map_err(DbError::from_pg)?;
    let released = client
        .pg()
        .query(&stmt, &[&id, &claim_epoch])
        .await
        .map_err(DbError::from_pg)?;
    if released.is_empty() {
        return Err(DbError::Lost(id.to_string()));
    }
    Ok(())
}

/// Cancels a run (see `spool.cancel_run` in the schema). Returns the run afterwards, or `None`
/// for an unknown id.
pub async fn cancel_run(client: &impl Conn, id: &str) -> Result<Option<Run>, DbError> {
    let stmt = client
        .stmt("select spool.cancel_run($1)")
        .await
        .map_err(DbError::from_pg)?;
    let status: Option<String> = client
        .pg()
        .query_one(&stmt, &[&id])
        .await
        .map_err(DbError::from_pg)?
        .get(0);
    if status.is_none() {
        return Ok(None);
    }
    get_run(client, id).await
}

/// One terminal transition to record in a batch (see [`finish_many_if_owned`]).
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: String,
    pub claim_epoch: i64,
    pub outcome: Outcome,
    pub output: Option<Value>,
    pub error: Option<Value>,
}

/// Ends many runs in one statement, each exactly as [`finish_if_owned`]. Returns, in input
/// order, whether each run was finished or lost.
pub async fn finish_many_if_owned(
    client: &impl Conn,
    finishes: &[Finish],
) -> Result<Vec<Result<(), DbError>>, DbError> {
    let stmt = client
        .stmt(concat!(
            "update spool.runs r
                set status = b.status, output = b.output, error = b.error,
                    finished_at = now(), updated_at = now()
               from unnest($1::text[], $2::int8[], $3::text[], $4::jsonb[], $5::jsonb[])
                    as b(id, epoch, status, output, error)
              where r.id = b.id and r.claim_epoch = b.epoch and r.status = 'running'
                and ",
            claimer_is_current!(),
            "
             returning r.id"
        ))
        .await
        .map_err(DbError::from_pg)?;
    let ids: Vec<&str> = finishes.iter().map(|f| f.id.as_str()).collect();
    let epochs: Vec<i64> = finishes.iter().map(|f| f.claim_epoch).collect();
    let statuses: Vec<&str> = finishes.iter().map(|f| f.outcome.as_str()).collect();
    let outputs: Vec<Option<&Value>> = finishes.iter().map(|f| f.output.as_ref()).collect();
    let errors: Vec<Option<&Value>> = finishes.iter().map(|f| f.error.as_ref()).collect();
    let rows = client
        .pg()
        .query(&stmt, &[&ids, &epochs, &statuses, &outputs, &errors])
        .await
        .map_err(DbError::from_pg)?;
    let done: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    Ok(finishes
        .iter()
        .map(|f| {
            if done.contains(&f.id) {
                Ok(())
            } else {
                Err(DbError::Lost(f.id.clone()))
            }
        })
        .collect())
}
