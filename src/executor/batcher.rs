//! Group commit for an executor's writes: step records and terminal transitions from all runs in
//! flight are queued, and whatever has queued up while earlier statements ran goes out as the
//! next statement (one round trip, one commit for many runs), with up to [`STREAMS`] statements
//! of a queue in flight (the second only once [`SECOND_STREAM_MIN`] writes wait). An idle
//! executor sends each write at once, so batching adds no latency; a busy one turns N commits
//! into one. A run waits for each of its writes before the next, so
//! no two statements in flight hold writes of the same run.
//!
//! Each write keeps its own fence: the batched statements are the same compare-and-set on
//! (id, claim epoch, status) as the single-row ones, and each write learns its own outcome.
//! One bad write must not fail the others: when a batch statement fails for any reason but a
//! lost connection, its writes are sent again one at a time through the same statement, so only
//! the write the database refuses gets an error.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::db::runs::{self, Finish};
use crate::db::steps::{self, StepRecorded, StepWrite};
use crate::db::{self, DbError};

/// Most writes in one statement.
const MAX_BATCH: usize = 512;
/// Statements of one queue in flight at once, each on its own pooled connection. Writes queue
/// up while all are busy, so batches stay large; with two, the database works on one batch while
/// the next one's results travel back, and can use two cores.
const STREAMS: usize = 2;
/// A statement goes out beside one already in flight only once this many writes wait: fewer
/// wait for it instead, and go out together with what queues up meanwhile. Small batches in
/// parallel cost a commit each for little overlap.
const SECOND_STREAM_MIN: usize = 64;

type Request<I, O> = (I, oneshot::Sender<Result<O, DbError>>);

/// What one batch statement answers: each write's own outcome in input order, or an error of
/// the statement as a whole.
pub type BatchResult<O> = Result<Vec<Result<O, DbError>>, DbError>;

/// A queue of writes executed in batches by one task.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<Request<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + Sync + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the batch task; `exec` runs one batch statement. A statement that fails for any
    /// reason but connectivity is retried one write at a time (see [`execute_isolating`]).
    pub fn start<F>(exec: F) -> (Self, JoinHandle<()>)
    where
        F: for<'a> Fn(&'a [I]) -> BoxFuture<'a, BatchResult<O>> + Send + Sync + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Request<I, O>>(MAX_BATCH * 4);
        let task = tokio::spawn(async move {
            let exec = &exec;
            let mut batch = Vec::with_capacity(MAX_BATCH);
            let mut running = FuturesUnordered::new();
            let mut open = true;
            while open || !running.is_empty() {
                tokio::select! {
                    n = rx.recv_many(&mut batch, MAX_BATCH),
                        if open && (running.is_empty()
                            || (running.len() < STREAMS && rx.len() >= SECOND_STREAM_MIN)) => {
                        if n == 0 {
                            open = false;
                            continue;
                        }
                        let (items, replies): (Vec<I>, Vec<_>) =
                            std::mem::take(&mut batch).into_iter().unzip();
                        running.push(async move {
                            let results = execute_isolating(exec, &items).await;
                            for (reply, result) in replies.into_iter().zip(results) {
                                let _ = reply.send(result);
                            }
                        });
                    }
                    Some(()) = running.next(), if !running.is_empty() => {}
                }
            }
        });
        (Self { tx }, task)
    }

    /// Queues one write and waits for its own outcome.
    pub async fn submit(&self, item: I) -> Result<O, DbError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| DbError::Batch("the executor is shutting down".into()))?;
        answer
            .await
            .map_err(|_| DbError::Batch("the executor is shutting down".into()))?
    }
}

/// Runs `items` as one statement. When the statement fails and the database was reachable, the
/// failure may belong to a single write (a value the database refuses), so each write is sent
/// again alone through the same fenced statement and gets its own outcome: the refused one its
/// own error, the others their normal result. A batch that failed because the database is
/// unreachable keeps one outcome for all, as does the rest of a one-by-one pass once a write
/// finds the database unreachable (each alone would only wait out the same patience again).
async fn execute_isolating<I, O, F>(exec: &F, items: &[I]) -> Vec<Result<O, DbError>>
where
    F: for<'a> Fn(&'a [I]) -> BoxFuture<'a, BatchResult<O>>,
{
    let error = match exec(items).await {
        Ok(results) => return results,
        Err(e) => e,
    };
    if items.len() == 1 {
        return vec![Err(error)];
    }
    if error.is_connectivity() {
        return spread(&error, items.len());
    }
    tracing::warn!(error = %error, writes = items.len(), "a batched write failed; writing its items one by one");
    let mut results = Vec::with_capacity(items.len());
    let mut unreachable: Option<String> = None;
    for one in items.chunks(1) {
        if let Some(message) = &unreachable {
            results.push(Err(DbError::Pool(message.clone())));
            continue;
        }
        results.push(match exec(one).await {
            Ok(mut result) => result
                .pop()
                .unwrap_or_else(|| Err(DbError::Batch("the statement gave no outcome".into()))),
            Err(e) => {
                if e.is_connectivity() {
                    unreachable = Some(e.to_string());
                }
                Err(e)
            }
        });
    }
    results
}

/// The executor's two write queues.
#[derive(Clone)]
pub struct Writes {
    pub steps: Batcher<StepWrite, StepRecorded>,
    pub finishes: Batcher<Finish, ()>,
}

impl Writes {
    /// Starts both batch tasks; the caller owns the returned handles.
    pub fn start(pool: Pool, patience: Duration) -> (Self, [JoinHandle<()>; 2]) {
        let pool = Arc::new(pool);
        let p = pool.clone();
        let (steps, a) = Batcher::start(move |items: &[StepWrite]| {
            let pool = p.clone();
            db::with_patience(patience, move || {
                let pool = pool.clone();
                async move {
                    let client = pool.get().await?;
                    steps::record_steps_if_owned(&client, items).await
                }
            })
            .boxed()
        });
        let (finishes, b) = Batcher::start(move |items: &[Finish]| {
            let pool = pool.clone();
            db::with_patience(patience, move || {
                let pool = pool.clone();
                async move {
                    let client = pool.get().await?;
                    runs::finish_many_if_owned(&client, items).await
                }
            })
            .boxed()
        });
        (Self { steps, finishes }, [a, b])
    }
}

/// A whole statement's failure as every one of its `n` writes' failure (connectivity stays
/// connectivity; the error itself cannot be cloned).
fn spread<O>(e: &DbError, n: usize) -> Vec<Result<O, DbError>> {
    let connectivity = e.is_connectivity();
    let message = e.to_string();
    (0..n)
        .map(|_| {
            Err(if connectivity {
                DbError::Pool(message.clone())
            } else {
                DbError::Batch(message.clone())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A batch statement stand-in over numbered writes: it refuses a whole batch that holds
    /// write 13 (as a CHECK constraint would), answers `n * 10` for every other write, and logs
    /// the batches it was given. `unreachable_at` makes the given write alone find the database
    /// gone, and `batch_error` replaces the refusal of a batch holding write 13.
    fn fake_statement(
        log: Arc<Mutex<Vec<Vec<u32>>>>,
        batch_error: fn() -> DbError,
        unreachable_at: Option<u32>,
    ) -> impl for<'a> Fn(&'a [u32]) -> BoxFuture<'a, BatchResult<u32>> + Send + Sync + 'static {
        move |items: &[u32]| {
            log.lock().unwrap().push(items.to_vec());
            let answer = if items.len() == 1 && Some(items[0]) == unreachable_at {
                Err(DbError::Pool("connection refused".into()))
            } else if items.contains(&13) {
                Err(batch_error())
            } else {
                Ok(items.iter().map(|n| Ok(n * 10)).collect())
            };
            async move { answer }.boxed()
        }
    }

    fn refused() -> DbError {
        DbError::Constraint {
            constraint: "no_thirteen".into(),
            message: "new row violates check constraint \"no_thirteen\"".into(),
        }
    }

    fn unreachable() -> DbError {
        DbError::Pool("connection refused".into())
    }

    /// Submits 1, 13 and 2 together: on this single-threaded runtime the batch task runs only
    /// after all three are queued, so they form one batch.
    async fn submit_three(batcher: &Batcher<u32, u32>) -> [Result<u32, DbError>; 3] {
        let (a, b, c) = tokio::join!(batcher.submit(1), batcher.submit(13), batcher.submit(2));
        [a, b, c]
    }

    #[tokio::test]
    async fn a_refused_write_fails_alone_and_its_batch_mates_are_written() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (batcher, task) = Batcher::start(fake_statement(log.clone(), refused, None));
        let [one, thirteen, two] = submit_three(&batcher).await;

        assert_eq!(one.unwrap(), 10);
        assert_eq!(two.unwrap(), 20);
        assert!(
            matches!(&thirteen, Err(DbError::Constraint { constraint, .. }) if constraint == "no_thirteen"),
            "the refused write keeps its own classified error: {thirteen:?}"
        );
        assert_eq!(
            *log.lock().unwrap(),
            vec![vec![1, 13, 2], vec![1], vec![13], vec![2]],
            "one batch, then each write alone through the same statement"
        );
        task.abort();
    }

    #[tokio::test]
    async fn a_batch_that_cannot_reach_the_database_fails_every_write_without_retrying_each() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (batcher, task) = Batcher::start(fake_statement(log.clone(), unreachable, None));
        let results = submit_three(&batcher).await;

        for result in &results {
            assert!(
                matches!(result, Err(e) if e.is_connectivity()),
                "{result:?}"
            );
        }
        assert_eq!(*log.lock().unwrap(), vec![vec![1, 13, 2]]);
        task.abort();
    }

    #[tokio::test]
    async fn writes_after_the_database_goes_away_in_a_one_by_one_pass_are_not_sent() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (batcher, task) = Batcher::start(fake_statement(log.clone(), refused, Some(1)));
        let results = submit_three(&batcher).await;

        for result in &results {
            assert!(
                matches!(result, Err(e) if e.is_connectivity()),
                "{result:?}"
            );
        }
        assert_eq!(
            *log.lock().unwrap(),
            vec![vec![1, 13, 2], vec![1]],
            "once a write alone finds the database unreachable, the rest get that outcome"
        );
        task.abort();
    }
}
