//! [`ChunkPublisher`]: the live output of one run attempt.
//!
//! Order of every attempt on its own subject: purge of that subject and of the run's older
//! attempts' subjects (awaited) → `reset` (when an earlier claim existed) → chunks → end. No
//! purge ever covers a newer attempt's subject, so a superseded attempt cannot delete the current
//! one's output. Every message carries run id, claim epoch and a sequence number, and
//! `Nats-Msg-Id = run:enqueue_seq:epoch:seq`. Publishes are pipelined: at most `ack_window` acks are pending
//! before the publisher awaits the oldest.
//!
//! When NATS fails (a publish, an ack or the purge), the publisher stops publishing, keeps the
//! chunks, and repairs the output at the next flush: purge, `reset`, every chunk again. The run
//! never waits on NATS beyond one operation timeout and never fails because of it.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::TryStreamExt;

use super::{header, LiveError, LiveOutput};
use crate::executor::ChunkSinkFactory;
use crate::workflow::{ChunkSink, RunEnd, RunIdentity};

/// How long a publisher keeps trying to republish a finished run's output while NATS is down.
const END_REPAIR_PATIENCE: Duration = Duration::from_secs(600);

/// Acks pending across every publisher of the process before each waits for its oldest: enough
/// to keep NATS busy, few enough that many concurrent runs do not pile up unbounded.
pub const MAX_ACKS_PENDING: usize = 8192;

/// Makes a [`ChunkPublisher`] per run attempt.
pub fn factory(live: Arc<LiveOutput>) -> ChunkSinkFactory {
    Arc::new(move |id: &RunIdentity| {
        Arc::new(ChunkPublisher::new(live.clone(), id)) as Arc<dyn ChunkSink>
    })
}

/// A cheap handle: clones share the attempt's state (the end's repair task holds one).
#[derive(Clone)]
pub struct ChunkPublisher {
    live: Arc<LiveOutput>,
    run_id: Arc<str>,
    epoch: i64,
    /// This attempt's subject.
    subject: String,
    /// The wildcard over every attempt's subject of this run.
    run_subjects: String,
    /// `run:enqueue_seq:epoch`, the start of every `Nats-Msg-Id` of this attempt (JetStream drops
    /// a message whose id it saw within the duplicate window, so ids are never reused, also not
    /// by a run id inserted again).
    msg_id_prefix: String,
    state: Arc<tokio::sync::Mutex<State>>,
}

struct State {
    /// The purge (and reset) of this attempt happened.
    started: bool,
    /// Sequence number of the last message published by this attempt (never reused).
    seq: u64,
    /// Output generation within the attempt: raised by every republish (rewind, repair), so
    /// attachers can drop messages of an earlier generation that arrive late.
    gen: u64,
    pending: Pending,
    /// Every chunk of this attempt in order, for a rewind or a repair.
    chunks: Vec<String>,
    /// A NATS operation failed; the output is republished at the next flush.
    broken: bool,
}

/// This attempt's publishes awaiting their ack, counted in the process-wide total too.
struct Pending {
    /// Each ack with when its message was published (for the lag histogram).
    acks: VecDeque<(tokio::time::Instant, PublishAckFuture)>,
    total: Arc<AtomicUsize>,
}

impl Pending {
    fn len(&self) -> usize {
        self.acks.len()
    }

    fn push(&mut self, ack: PublishAckFuture) {
        self.acks.push_back((tokio::time::Instant::now(), ack));
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn pop(&mut self) -> Option<(tokio::time::Instant, PublishAckFuture)> {
        let ack = self.acks.pop_front()?;
        self.total.fetch_sub(1, Ordering::Relaxed);
        Some(ack)
    }

    fn clear(&mut self) {
        self.total.fetch_sub(self.acks.len(), Ordering::Relaxed);
        self.acks.clear();
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.clear();
    }
}

impl ChunkPublisher {
    pub fn new(live: Arc<LiveOutput>, id: &RunIdentity) -> Self {
        let state = State {
            started: false,
            seq: 0,
            gen: 0,
            pending: Pending {
                acks: VecDeque::new(),
                total: live.acks_pending.clone(),
            },
            chunks: Vec::new(),
            broken: false,
        };
        Self {
            subject: live.subject(&id.run_id, id.enqueue_seq, id.claim_epoch),
            run_subjects: live.run_subjects(&id.run_id, id.enqueue_seq),
            msg_id_prefix: format!("{}:{}:{}", id.run_id, id.enqueue_seq, id.claim_epoch),
            live,
            run_id: Arc::from(id.run_id.as_str()),
            epoch: id.claim_epoch,
            state: Arc::new(tokio::sync::Mutex::new(state)),
        }
    }

    fn headers(&self, kind: &str, seq: u64, gen: u64) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::KIND, kind);
        h.insert(header::RUN, &*self.run_id);
        h.insert(header::EPOCH, self.epoch.to_string().as_str());
        h.insert(header::SEQ, seq.to_string().as_str());
        h.insert(header::GEN, gen.to_string().as_str());
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}:{seq}", self.msg_id_prefix).as_str(),
        );
        h
    }

    async fn timed<T, E: std::fmt::Display>(
        &self,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, LiveError> {
        let limit = self.live.settings.op_timeout;
        match tokio::time::timeout(limit, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LiveError::Nats(e.to_string())),
            Err(_) => Err(LiveError::Timeout(limit)),
        }
    }

    /// Sends one message — in parts when it is larger than NATS carries (attachers reassemble
    /// them); waits for the oldest ack when the attempt's window is full, or when the whole
    /// process has [`MAX_ACKS_PENDING`] acks pending (each attempt may always have one).
    async fn publish(&self, st: &mut State, kind: &str, payload: Bytes) -> Result<(), LiveError> {
        let max = self.live.max_part();
        if payload.len() <= max {
            return self.publish_part(st, kind, payload, None).await;
        }
        let parts = payload.len().div_ceil(max);
        for i in 0..parts {
            let part = payload.slice(i * max..((i + 1) * max).min(payload.len()));
            self.publish_part(st, kind, part, Some((i + 1, parts)))
                .await?;
        }
        Ok(())
    }

    async fn publish_part(
        &self,
        st: &mut State,
        kind: &str,
        payload: Bytes,
        part: Option<(usize, usize)>,
    ) -> Result<(), LiveError> {
        st.seq += 1;
        let mut headers = self.headers(kind, st.seq, st.gen);
        if let Some((i, n)) = part {
            headers.insert(header::PART, format!("{i}/{n}").as_str());
        }
        let ack = self
            .timed(
                self.live
                    .js
                    .publish_with_headers(self.subject.clone(), headers, payload),
            )
            .await?;
        st.pending.push(ack);
        while st.pending.len() > self.live.settings.ack_window
            || (st.pending.len() > 1
                && self.live.acks_pending.load(Ordering::Relaxed) > MAX_ACKS_PENDING)
        {
            let (sent, oldest) = st.pending.pop().expect("non-empty");
            self.timed(oldest.into_future()).await?;
            crate::latency::PUBLISH_ACK.observe(sent.elapsed());
        }
        Ok(())
    }

    /// Awaits every pending ack; returns the stream sequence of the last one (0 when none).
    async fn await_acks(&self, st: &mut State) -> Result<u64, LiveError> {
        let mut last = 0;
        while let Some((sent, ack)) = st.pending.pop() {
            last = self.timed(ack.into_future()).await?.sequence;
            crate::latency::PUBLISH_ACK.observe(sent.elapsed());
        }
        Ok(last)
    }

    /// Purges this attempt's subject and the older attempts' ones (awaited), then publishes
    /// `reset` on a re-run. Old acks are dropped: whatever they acknowledged is gone with the
    /// purge. With `republish` (a rewind or a repair) the
    /// output starts a new generation and every kept chunk is published again.
    async fn restart(&self, st: &mut State, republish: bool) -> Result<(), LiveError> {
        st.pending.clear();
        let stream = self.live.ensure_stream().await?;
        // Publishes still buffered in the client from before an outage go out first, so the
        // purge below removes them instead of their landing after it.
        self.timed(self.live.client.flush()).await?;
        self.timed(stream.purge().filter(self.subject.clone()).into_future())
            .await?;
        if self.epoch > 1 {
            self.purge_older_attempts(stream).await?;
        }
        st.started = true;
        if self.epoch > 1 || republish {
            if republish {
                st.gen += 1;
            }
            self.publish(st, "reset", Bytes::new()).await?;
            let reset_at = self.await_acks(st).await?;
            if republish {
                // Stale publishes of the earlier generation that still landed between the purge
                // and the reset go too; any landing later are dropped by attachers (generation).
                self.timed(
                    stream
                        .purge()
                        .filter(self.subject.clone())
                        .sequence(reset_at)
                        .into_future(),
                )
                .await?;
            }
        }
        if republish {
            let chunks = st.chunks.clone();
            for chunk in chunks {
                self.publish(st, "chunk", Bytes::from(chunk)).await?;
            }
        }
        Ok(())
    }

    /// Purges the subjects of this run's attempts with a lower claim epoch (a killed attempt's
    /// output, and whatever a superseded one published so far). Later publishes of a superseded
    /// attempt stay on its own subject, where attachers ignore them until they expire.
    async fn purge_older_attempts(&self, stream: &stream::Stream) -> Result<(), LiveError> {
        let older = self
            .timed(async {
                let mut subjects = stream
                    .info_with_subjects(&self.run_subjects)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut older = Vec::new();
                while let Some((subject, _count)) =
                    subjects.try_next().await.map_err(|e| e.to_string())?
                {
                    if LiveOutput::epoch_of_subject(&subject).is_some_and(|e| e < self.epoch) {
                        older.push(subject);
                    }
                }
                Ok::<_, String>(older)
            })
            .await?;
        for subject in older {
            self.timed(stream.purge().filter(subject).into_future())
                .await?;
        }
        Ok(())
    }

    fn broke(&self, st: &mut State, e: LiveError) {
        crate::latency::PUBLISH_ERRORS.fetch_add(1, Ordering::Relaxed);
        if !st.broken {
            tracing::warn!(run = %self.run_id, error = %e, "live output unavailable; the run goes on and its output is republished when NATS answers");
        }
        st.broken = true;
        st.pending.clear();
    }

    /// Makes the subject hold this attempt's output so far: repairs a broken output, awaits acks.
    async fn settle(&self, st: &mut State) -> Result<(), LiveError> {
        if st.broken {
            self.restart(st, true).await?;
            st.broken = false;
        } else if !st.started && self.epoch > 1 {
            // nothing emitted by this attempt, but an earlier one may have: clear it
            self.restart(st, false).await?;
        }
        self.await_acks(st).await.map(|_| ())
    }
}

impl ChunkSink for ChunkPublisher {
    fn emit(&self, chunk: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            st.chunks.push(chunk.clone());
            if st.broken {
                return;
            }
            let result = async {
                if !st.started {
                    self.restart(&mut st, false).await?;
                }
                self.publish(&mut st, "chunk", Bytes::from(chunk)).await
            }
            .await;
            if let Err(e) = result {
                self.broke(&mut st, e);
            }
        })
    }

    fn rewind(&self, keep: usize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            st.chunks.truncate(keep);
            if let Err(e) = self.restart(&mut st, true).await {
                self.broke(&mut st, e);
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            if let Err(e) = self.settle(&mut st).await {
                self.broke(&mut st, e);
            }
        })
    }

    fn finish(&self, end: RunEnd) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (kind, payload) = match &end {
                RunEnd::Done(v) => ("done", v),
                RunEnd::Failed(v) => ("failed", v),
                RunEnd::Cancelled(v) => ("cancelled", v),
            };
            let body = Bytes::from(serde_json::to_vec(payload).unwrap_or_default());
            if let Err(e) = self.publish_end(kind, body.clone()).await {
                // Attachers meanwhile fall back to the run's status and output in Postgres; the
                // output is republished whole, with its end, once NATS answers again — unless the
                // process's repairs already hold their bound, in count or bytes.
                let held = body.len() + self.chunk_bytes().await;
                let me = self.clone();
                let repair = async move {
                    let mut backoff = Duration::from_millis(500);
                    let give_up = tokio::time::Instant::now() + END_REPAIR_PATIENCE;
                    while tokio::time::Instant::now() < give_up {
                        tokio::time::sleep(backoff).await;
                        if me.publish_end(kind, body.clone()).await.is_ok() {
                            tracing::info!(run = %me.run_id, "live output repaired");
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    tracing::warn!(run = %me.run_id, "gave up republishing the live output; attachers get the end from Postgres");
                };
                if self.live.spawn_repair(held, repair) {
                    tracing::warn!(run = %self.run_id, error = %e, "cannot publish the end of the live output; retrying in the background");
                } else {
                    tracing::warn!(run = %self.run_id, error = %e, bytes = held, "cannot publish the end of the live output, and the repairs in the background are at their bound; attachers get the end from Postgres");
                }
            }
        })
    }
}

impl ChunkPublisher {
    /// Bytes of the chunks this attempt keeps for a republish.
    async fn chunk_bytes(&self) -> usize {
        self.state.lock().await.chunks.iter().map(String::len).sum()
    }

    /// Settles the output (repairing it if needed), then publishes the end and awaits its ack.
    async fn publish_end(&self, kind: &str, body: Bytes) -> Result<(), LiveError> {
        let mut st = self.state.lock().await;
        let result = async {
            self.settle(&mut st).await?;
            self.publish(&mut st, kind, body).await?;
            self.await_acks(&mut st).await.map(|_| ())
        }
        .await;
        if let Err(e) = &result {
            st.broken = true;
            st.pending.clear();
            tracing::debug!(run = %self.run_id, error = %e, "end not published");
        }
        result
    }
}
