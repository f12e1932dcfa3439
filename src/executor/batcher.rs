//! Group commit for an executor's writes: step records and terminal transitions from all runs in
//! flight are queued, and whatever has queued up while the previous statement ran goes out as the
//! next statement (one round trip, one commit for many runs). An idle executor sends each write
//! at once, so batching adds no latency; a busy one turns N commits into one.
//!
//! Each write keeps its own fence: the batched statements are the same compare-and-set on
//! (id, claim epoch, status) as the single-row ones, and each write learns its own outcome.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::db::runs::{self, Finish};
use crate::db::steps::{self, StepRecorded, StepWrite};
use crate::db::{self, DbError};

/// Most writes in one statement.
const MAX_BATCH: usize = 512;

type Request<I, O> = (I, oneshot::Sender<Result<O, DbError>>);

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

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the batch task; `exec` runs one batch and answers each item in order.
    pub fn start<F, Fut>(exec: F) -> (Self, JoinHandle<()>)
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<O, DbError>>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Request<I, O>>(MAX_BATCH * 4);
        let task = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                let (items, replies): (Vec<I>, Vec<_>) =
                    std::mem::take(&mut batch).into_iter().unzip();
                let results = exec(items).await;
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
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
        let (steps, a) = Batcher::start(move |items: Vec<StepWrite>| {
            let pool = p.clone();
            async move {
                let n = items.len();
                let r = db::with_patience(patience, || async {
                    let client = pool.get().await?;
                    steps::record_steps_if_owned(&client, &items).await
                })
                .await;
                spread(r, n)
            }
        });
        let (finishes, b) = Batcher::start(move |items: Vec<Finish>| {
            let pool = pool.clone();
            async move {
                let n = items.len();
                let r = db::with_patience(patience, || async {
                    let client = pool.get().await?;
                    runs::finish_many_if_owned(&client, &items).await
                })
                .await;
                spread(r, n)
            }
        });
        (Self { steps, finishes }, [a, b])
    }
}

/// A batch's failure becomes every item's failure (connectivity stays connectivity).
fn spread<O>(r: Result<Vec<Result<O, DbError>>, DbError>, n: usize) -> Vec<Result<O, DbError>> {
    match r {
        Ok(v) => v,
        Err(e) => {
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
    }
}
