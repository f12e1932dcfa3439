//! SQL for `spool.runs`: enqueue, read, the claim, and every fenced transition of a claimed run.
//!
//! The claim is one statement. Every later transition is a compare-and-set on (id, claim_epoch,
//! status = 'running') and returns [`DbError::Lost`] when it affects zero rows.

use super::Conn;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;

use super::{batch_fence, claimer_is_current, DbError};

mod claim;
mod watch;
pub use claim::{
    adopt_orphaned_runs, claim, claim_sql, promote_waiting_keys, reclaim_owned, Claimant, Reclaimed,
};
pub use watch::{ended_runs, key_follow_start, next_started_run_of_key, run_of_key_at, EndedRun};

/// Run columns in the order [`Run::from_row`] reads them.
pub(crate) const RUN_COLUMNS: &str =
    "r.id, r.workflow, r.input, r.queue, r.concurrency_key, r.priority, \
     r.run_at, r.status, r.executor_id, r.attempt, r.max_attempts, r.claim_epoch, \
     r.cancel_requested, r.output, r.error, r.created_at, r.started_at, r.finished_at, \
     r.updated_at, r.enqueue_seq";

/// A run: one row of `spool.runs`. Every field is always present (`null` where the column is),
/// but `undecodable`, which only a row the server could not fully decode has.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Run {
    /// 1–128 letters, digits, `-`, `_`, `:` (constraint `runs_id_format`).
    #[schema(pattern = "^[A-Za-z0-9_:-]{1,128}$")]
    pub id: String,
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    pub workflow: String,
    /// The run's input, any JSON (`null` when the row's value could not be decoded).
    pub input: Value,
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    pub queue: String,
    /// Runs with the same (queue, key) run one at a time, in enqueue order.
    #[schema(required = true, min_length = 1)]
    pub concurrency_key: Option<String>,
    /// Lower runs first.
    pub priority: i32,
    /// Earliest start.
    pub run_at: DateTime<Utc>,
    #[schema(value_type = crate::validate::RunStatus)]
    pub status: String,
    /// The executor that owns the run (always set while `running`).
    #[schema(required = true)]
    pub executor_id: Option<String>,
    /// Claims charged to the run.
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub attempt: i32,
    /// Charged claims allowed before the run ends `dead`.
    #[schema(minimum = 1, maximum = 1000)]
    pub max_attempts: i32,
    /// Changes on every claim; every executor write is conditioned on it.
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_i64)]
    pub claim_epoch: i64,
    /// A cancel of the running run was asked for.
    pub cancel_requested: bool,
    /// The workflow's result, any JSON; `null` until it succeeded.
    #[schema(required = true, value_type = Value)]
    pub output: Option<Value>,
    /// Why it failed, was cancelled or died: `{"code", "message", …}` as Spool writes it; any
    /// JSON in a row written by hand.
    #[schema(required = true, value_type = Value)]
    pub error: Option<Value>,
    pub created_at: DateTime<Utc>,
    #[schema(required = true)]
    pub started_at: Option<DateTime<Utc>>,
    /// Set exactly when the status is terminal.
    #[schema(required = true)]
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    pub enqueue_seq: i64,
    // (see `Run::from_row_offset`)
    /// Columns that could not be decoded, shown as `null` (the run fails with
    /// `undecodable_row`); absent for every row the schema's constraints and the decoder agree
    /// on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub undecodable: Vec<String>,
}

impl Run {
    pub(crate) fn from_row(row: &Row) -> Self {
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
    /// `queue` or `replace` (see `spool.runs.key_policy`); `None` is the default, `queue`.
    pub key_policy: Option<String>,
}

/// Inserts a run. Returns `(run, true)` when created, `(existing, false)` when the id existed.
pub async fn insert_run(client: &impl Conn, new: &NewRun) -> Result<(Run, bool), DbError> {
    let sql = format!(
        "with ins as (
            insert into spool.runs as r (id, workflow, input, queue, concurrency_key, priority,
                                         max_attempts, run_at, key_policy)
            values (coalesce($1, gen_random_uuid()::text), $2, $3, coalesce($4, 'default'), $5,
                    coalesce($6, 0), coalesce($7, 5),
                    coalesce($8::timestamptz, now() + make_interval(secs => coalesce($9::int8, 0)::float8 / 1000)),
                    coalesce($10, 'queue'))
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
        .query_opt(
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
                &new.key_policy,
            ],
        )
        .await
        .map_err(DbError::from_pg)?;
    let Some(row) = row else {
        // A concurrent insert of the same id committed while ours waited on it: ON CONFLICT saw
        // it, but this statement's snapshot predates it. A new statement sees it.
        let id = new.id.as_deref().unwrap_or_default();
        return get_run(client, id)
            .await?
            .map(|run| (run, false))
            .ok_or_else(|| DbError::Lost(id.to_string()));
    };
    let created: bool = row.get(0);
    // skip the leading flag column
    let run = Run::from_row_offset(&row, 1);
    Ok((run, created))
}

impl Run {
    /// Decodes a row, never panicking: a column this code cannot carry (JSON nested deeper than
    /// the decoder allows, a number outside f64, a timestamp outside chrono's range) decodes as
    /// null or the epoch and is named in [`Run::undecodable`]; the executor fails such a run
    /// with `undecodable_row` and the API shows it with the note.
    pub(crate) fn from_row_offset(row: &Row, offset: usize) -> Self {
        let mut notes = Vec::new();
        let mut d = Decoder {
            row,
            offset,
            notes: &mut notes,
        };
        let mut run = Self {
            id: d.get(0, "id"),
            workflow: d.get(1, "workflow"),
            input: d.get::<Option<Value>>(2, "input").unwrap_or(Value::Null),
            queue: d.get(3, "queue"),
            concurrency_key: d.get(4, "concurrency_key"),
            priority: d.get(5, "priority"),
            run_at: d.get_or(6, "run_at", DateTime::<Utc>::UNIX_EPOCH),
            status: d.get(7, "status"),
            executor_id: d.get(8, "executor_id"),
            attempt: d.get(9, "attempt"),
            max_attempts: d.get(10, "max_attempts"),
            claim_epoch: d.get(11, "claim_epoch"),
            cancel_requested: d.get(12, "cancel_requested"),
            output: d.get(13, "output"),
            error: d.get(14, "error"),
            created_at: d.get_or(15, "created_at", DateTime::<Utc>::UNIX_EPOCH),
            started_at: d.get(16, "started_at"),
            finished_at: d.get(17, "finished_at"),
            updated_at: d.get_or(18, "updated_at", DateTime::<Utc>::UNIX_EPOCH),
            enqueue_seq: d.get(19, "enqueue_seq"),
            undecodable: Vec::new(),
        };
        run.undecodable = notes;
        run
    }
}

/// Reads columns of one row without panicking; what fails to decode is noted by column name.
struct Decoder<'a> {
    row: &'a Row,
    offset: usize,
    notes: &'a mut Vec<String>,
}

impl<'a> Decoder<'a> {
    fn get<T: tokio_postgres::types::FromSql<'a> + Default>(
        &mut self,
        i: usize,
        column: &str,
    ) -> T {
        self.get_or(i, column, T::default())
    }

    fn get_or<T: tokio_postgres::types::FromSql<'a>>(
        &mut self,
        i: usize,
        column: &str,
        fallback: T,
    ) -> T {
        match self.row.try_get(i + self.offset) {
            Ok(v) => v,
            Err(e) => {
                self.notes
                    .push(format!("{column}: {}", describe_decode(&e)));
                fallback
            }
        }
    }
}

/// A decode error's cause (tokio-postgres's own text only names the column index).
fn describe_decode(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => cause.to_string(),
        None => e.to_string(),
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
    /// Runs whose id starts with this.
    pub id_prefix: Option<String>,
    pub before_seq: Option<i64>,
    pub limit: i64,
    /// `input`, `output`, `error` in full whatever their size (otherwise only up to
    /// `inline_max` bytes of JSON each).
    pub include: [bool; 3],
    pub inline_max: i64,
    /// Rows stop once the values listed so far exceed this many bytes (at least one row).
    pub max_bytes: i64,
}

/// A listed run, with the JSON size of each of `input`, `output`, `error` left out of it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub run: Run,
    pub omitted: Vec<(&'static str, i64)>,
}

/// A page of runs, newest first, bounded by rows and by bytes: `input`, `output` and `error`
/// larger than `inline_max` are left out unless included, and rows stop when the values so far
/// pass `max_bytes` (the first row always comes, whatever its size). Sizes are measured in
/// Postgres, so neither the transfer nor this process's memory grows with what is left out.
/// `more`: runs matching the filter remain after the page (one row past the limit is sized to
/// know, never fetched), so the last page says so and no empty page follows it.
pub async fn list_runs(client: &impl Conn, f: &RunFilter) -> Result<(Vec<Listed>, bool), DbError> {
    let sql = "with page as (
           select r.*, octet_length(r.input::text) as input_len,
                  coalesce(octet_length(r.output::text), 0) as output_len,
                  coalesce(octet_length(r.error::text), 0) as error_len
             from spool.runs r
            where ($1::text is null or r.status = $1)
              and ($2::text is null or r.workflow = $2)
              and ($3::text is null or r.queue = $3)
              and ($4::text is null or r.concurrency_key = $4)
              and ($5::int8 is null or r.enqueue_seq < $5)
              and ($12::text is null or starts_with(r.id, $12))
            order by r.enqueue_seq desc
            limit $6::int8 + 1
         ), sized as (
           select p.*,
                  512 + case when $7 or p.input_len <= $10::int8 then p.input_len else 0 end
                      + case when $8 or p.output_len <= $10::int8 then p.output_len else 0 end
                      + case when $9 or p.error_len <= $10::int8 then p.error_len else 0 end
                    as row_bytes
             from page p
         ), bounded as (
           select s.*, sum(s.row_bytes) over (order by s.enqueue_seq desc) as running,
                  row_number() over (order by s.enqueue_seq desc) as n,
                  count(*) over () as page_rows
             from sized s
         )
         select r.id, r.workflow,
                case when $7 or r.input_len <= $10::int8 then r.input end,
                r.queue, r.concurrency_key, r.priority, r.run_at, r.status, r.executor_id,
                r.attempt, r.max_attempts, r.claim_epoch, r.cancel_requested,
                case when $8 or r.output_len <= $10::int8 then r.output end,
                case when $9 or r.error_len <= $10::int8 then r.error end,
                r.created_at, r.started_at, r.finished_at, r.updated_at, r.enqueue_seq,
                r.input_len, r.output_len, r.error_len, r.page_rows
           from bounded r
          where r.n <= $6::int8 and (r.n = 1 or r.running - r.row_bytes < $11::int8)
          order by r.enqueue_seq desc";
    let stmt = client.stmt(sql).await.map_err(DbError::from_pg)?;
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
                &f.include[0],
                &f.include[1],
                &f.include[2],
                &f.inline_max,
                &f.max_bytes,
                &f.id_prefix,
            ],
        )
        .await
        .map_err(DbError::from_pg)?;
    // Every row of the page but the returned ones lies after them (cut by the row limit, the
    // byte bound, or the one row looked ahead).
    let page_rows: i64 = rows.first().map(|r| r.get(23)).unwrap_or(0);
    let more = page_rows > rows.len() as i64;
    let listed = rows
        .iter()
        .map(|row| {
            let mut omitted = Vec::new();
            for (i, name) in ["input", "output", "error"].into_iter().enumerate() {
                let len: Option<i32> = row.get(20 + i);
                let len = len.unwrap_or(0) as i64;
                if !f.include[i] && len > f.inline_max {
                    omitted.push((name, len));
                }
            }
            Listed {
                run: Run::from_row(row),
                omitted,
            }
        })
        .collect();
    Ok((listed, more))
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
              where id = $1 and claim_epoch = $2 and (status = 'running') is true
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
                 where id = $1 and claim_epoch = $2 and (status = 'running') is true
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

/// The statement of [`finish_many_if_owned`] (public for the tests of its plan).
pub const FINISH_MANY_SQL: &str = concat!(
    "with b as materialized (",
    batch_fence!(
        "unnest($1::text[], $2::int8[], $3::text[], $4::jsonb[], $5::jsonb[])
                    as u(id, epoch, status, output, error)",
        "u.id"
    ),
    ")
             update spool.runs r
                set status = b.status, output = b.output, error = b.error,
                    finished_at = now(), updated_at = now()
               from b
              where r.id = b.id and r.claim_epoch = b.epoch and r.status = b.was
                and r.executor_id = b.claimer and r.incarnation = b.claimer_incarnation
             returning r.id"
);

/// Ends many runs in one statement, each exactly as [`finish_if_owned`]. Returns, in input
/// order, whether each run was finished or lost.
pub async fn finish_many_if_owned(
    client: &impl Conn,
    finishes: &[Finish],
) -> Result<Vec<Result<(), DbError>>, DbError> {
    let stmt = client
        .stmt(FINISH_MANY_SQL)
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
    let mut done: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
    if done.len() < finishes.len() {
        // A retry after a lost reply finds its own committed transition: the run ended with this
        // status at this claim epoch, which only this claim can have written.
        let stmt = client
            .stmt(
                "select r.id from spool.runs r
                   join unnest($1::text[], $2::int8[], $3::text[]) as b(id, epoch, status)
                     on r.id = b.id and r.claim_epoch = b.epoch and r.status = b.status",
            )
            .await
            .map_err(DbError::from_pg)?;
        let rows = client
            .pg()
            .query(&stmt, &[&ids, &epochs, &statuses])
            .await
            .map_err(DbError::from_pg)?;
        done.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
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

/// The running runs of `executor_id` whose cancellation was requested: a walk of the partial
/// index of running runs, one executor's share of it, however many runs it executes.
pub async fn cancel_requested_of(
    client: &impl Conn,
    executor_id: &str,
) -> Result<Vec<String>, DbError> {
    let stmt = client
        .stmt(
            "select id from spool.runs
              where executor_id = $1 and status = 'running' and cancel_requested",
        )
        .await
        .map_err(DbError::from_pg)?;
    let rows = client
        .pg()
        .query(&stmt, &[&executor_id])
        .await
        .map_err(DbError::from_pg)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
