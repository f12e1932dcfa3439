//! [`ChunkPublisher`]: the live output of one run attempt.
//!
//! Order of every attempt on its own subject: purge of that subject and of the run's older
//! attempts' subjects (awaited) → `reset` (when an earlier claim existed) → chunks → end. No
//! purge ever covers a newer attempt's subject, so a superseded attempt cannot delete the current
//! one's output. Every message carries run id, claim epoch and a sequence number, and
//! `Nats-Msg-Id = run:enqueue_seq:epoch:seq`. Publishes are pipelined: at most `ack_window` acks are pending
//! before the publisher awaits the oldest.
//!
//! A message JetStream does not acknowledge (the stream is electing a new leader after a NATS
//! node died, the node the client is connected to died with it) is not given up: the publisher
//! stops sending, learns every outstanding outcome ([`InFlight`]) and sends that message and
//! every one after it again, in order, under the same numbers and ids — the oldest alone first,
//! backing off until it is stored, then the rest and whatever was emitted meanwhile. JetStream
//! stores none twice (duplicate window), so when only the lost messages were missing, attachers
//! see the output continue with nothing missing, nothing twice and no `reset`. A resend is
//! bounded: it must come within half the stream's duplicate window of the message's first send.
//!
//! When the subject cannot be mended in place (a later message was stored before a lost one,
//! the resend window passed, a purge failed), the output is *broken*: the publisher keeps the
//! chunks and republishes them as a new generation (purge of its own subject, `reset`, every
//! chunk again) as soon as NATS answers — during the run, and at the latest before the end.
//! The run never waits on NATS beyond about one operation timeout at a time and never fails
//! because of it.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::TryStreamExt;
use tokio::time::Instant;

use super::acks::{ack_within, InFlight, Outgoing, Verdict};
use super::{header, LiveError, LiveOutput};
use crate::executor::ChunkSinkFactory;
use crate::workflow::{ChunkSink, RunEnd, RunIdentity};

/// How long a publisher keeps trying to republish a finished run's output while NATS is down.
const END_REPAIR_PATIENCE: Duration = Duration::from_secs(600);

/// Acks pending across every publisher of the process before each waits for its oldest: enough
/// to keep NATS busy, few enough that many concurrent runs do not pile up unbounded.
pub const MAX_ACKS_PENDING: usize = 8192;

/// First and longest wait before lost messages are sent again (doubling in between).
const RESEND_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// First and longest wait before a broken output is republished during the run.
const REPAIR_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));
/// Resends a flush makes (each after its backoff) before it leaves lost messages to the next.
const DRAIN_ROUNDS: usize = 4;

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
    /// Sequence number of the last message numbered by this attempt (never reused).
    seq: u64,
    /// Output generation within the attempt: raised by every republish (rewind, repair), so
    /// attachers can drop messages of an earlier generation that arrive late.
    gen: u64,
    /// Messages sent and not yet known stored in order.
    in_flight: InFlight,
    /// Messages numbered and not stored, in order: lost ones to send again, then those emitted
    /// while they wait. Nothing is sent past them.
    backlog: VecDeque<Outgoing>,
    /// When the backlog is next sent, and the wait after that should it fail again.
    resend_at: Instant,
    resend_backoff: Duration,
    /// Every chunk of this attempt in order, for a rewind or a republish.
    chunks: Vec<String>,
    /// The output needs a new generation (republished during the run or before the end).
    broken: bool,
    /// While broken: when to republish next, and the wait after that should it fail again.
    repair_at: Instant,
    repair_backoff: Duration,
    /// The end message is numbered (sent, or in the backlog): a retry of the end resends it
    /// rather than numbering another.
    end_queued: bool,
}

impl State {
    /// Messages found not stored go back to the front of the backlog, in order, to be sent
    /// again after the backoff.
    fn requeue(&mut self, lost: Vec<Outgoing>) {
        for msg in lost.into_iter().rev() {
            self.backlog.push_front(msg);
        }
        self.resend_later();
    }

    /// Sending the backlog waits longer, up to its bound.
    fn resend_later(&mut self) {
        self.resend_at = Instant::now() + self.resend_backoff;
        self.resend_backoff = (self.resend_backoff * 2).min(RESEND_BACKOFF.1);
    }
}

impl ChunkPublisher {
    pub fn new(live: Arc<LiveOutput>, id: &RunIdentity) -> Self {
        let state = State {
            started: false,
            seq: 0,
            gen: 0,
            in_flight: InFlight::new(live.acks_pending.clone()),
            backlog: VecDeque::new(),
            resend_at: Instant::now(),
            resend_backoff: RESEND_BACKOFF.0,
            chunks: Vec::new(),
            broken: false,
            repair_at: Instant::now(),
            repair_backoff: REPAIR_BACKOFF.0,
            end_queued: false,
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

    fn headers(&self, m: &Outgoing) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::KIND, m.kind);
        h.insert(header::RUN, &*self.run_id);
        h.insert(header::EPOCH, self.epoch.to_string().as_str());
        h.insert(header::SEQ, m.seq.to_string().as_str());
        h.insert(header::GEN, m.gen.to_string().as_str());
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}:{}", self.msg_id_prefix, m.seq).as_str(),
        );
        if let Some((i, n)) = m.part {
            h.insert(header::PART, format!("{i}/{n}").as_str());
        }
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

    /// Numbers one message — in parts when it is larger than NATS carries (attachers reassemble
    /// them).
    fn number(&self, st: &mut State, kind: &'static str, payload: Bytes) -> Vec<Outgoing> {
        let max = self.live.max_part();
        let parts = payload.len().div_ceil(max).max(1);
        (0..parts)
            .map(|i| {
                st.seq += 1;
                Outgoing {
                    seq: st.seq,
                    gen: st.gen,
                    kind,
                    part: (parts > 1).then_some((i + 1, parts)),
                    payload: payload.slice(i * max..((i + 1) * max).min(payload.len())),
                    created: Instant::now(),
                }
            })
            .collect()
    }

    /// Sends one message and takes in the acks that have arrived; waits for the oldest ack when
    /// the attempt's window is full, or when the whole process has [`MAX_ACKS_PENDING`] acks
    /// pending (each attempt may always have one). Err once a message in flight failed or was
    /// stored out of order.
    async fn transmit(&self, st: &mut State, msg: Outgoing) -> Result<(), LiveError> {
        let publish = self.live.js.publish_with_headers(
            self.subject.clone(),
            self.headers(&msg),
            msg.payload.clone(),
        );
        match self.timed(publish).await {
            Ok(ack) => st
                .in_flight
                .push(msg, ack_within(ack, self.live.settings.op_timeout)),
            Err(e) => st.in_flight.push_failed(msg, e),
        }
        st.in_flight.check()?;
        while st.in_flight.len() > self.live.settings.ack_window
            || (st.in_flight.len() > 1
                && self.live.acks_pending.load(Ordering::Relaxed) > MAX_ACKS_PENDING)
        {
            st.in_flight.wait_oldest().await?;
        }
        Ok(())
    }

    /// Publishes one message in order: behind the backlog when there is one. Err when the
    /// output is broken (it needs a new generation).
    async fn publish(
        &self,
        st: &mut State,
        kind: &'static str,
        payload: Bytes,
    ) -> Result<(), LiveError> {
        for msg in self.number(st, kind, payload) {
            if !st.backlog.is_empty() {
                st.backlog.push_back(msg);
                self.resend(st, false).await?;
            } else if let Err(e) = self.transmit(st, msg).await {
                self.recover(st, e).await?;
            }
        }
        Ok(())
    }

    /// Publishes one message or fails: for a republish, which is all or nothing.
    async fn publish_whole(
        &self,
        st: &mut State,
        kind: &'static str,
        payload: Bytes,
    ) -> Result<(), LiveError> {
        for msg in self.number(st, kind, payload) {
            self.transmit(st, msg).await?;
        }
        Ok(())
    }

    /// After a message failed: learns every outcome in flight; the failed message and those
    /// after it go to the front of the backlog. Err when the subject holds them out of order.
    async fn recover(&self, st: &mut State, error: LiveError) -> Result<(), LiveError> {
        match st.in_flight.settle().await {
            Verdict::Stored => Ok(()),
            Verdict::Gap(why) => Err(LiveError::Nats(format!("{why} (after: {error})"))),
            Verdict::Resend(lost, error) => {
                if st.backlog.is_empty() {
                    crate::latency::PUBLISH_ERRORS.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(run = %self.run_id, messages = lost.len(), %error, "live output not acknowledged; sending it again in order");
                }
                st.requeue(lost);
                Ok(())
            }
        }
    }

    /// Sends the backlog when it is due (`now`: at once, waiting for the outcome): its oldest
    /// message alone, then, once that one is stored, the rest. While the oldest is not stored
    /// the backlog waits, backing off. Err when the output is broken.
    ///
    /// While there is a backlog, nothing but its oldest message is in flight.
    async fn resend(&self, st: &mut State, now: bool) -> Result<(), LiveError> {
        if st.backlog.is_empty() {
            return Ok(());
        }
        if !st.in_flight.is_empty() {
            // the oldest, sent alone, is out: go on once it is stored
            match st.in_flight.check() {
                Ok(()) if st.in_flight.is_empty() => {}
                Ok(()) if !now => return Ok(()),
                Ok(()) => {
                    if let Err(e) = st.in_flight.wait_oldest().await {
                        return self.recover(st, e).await;
                    }
                }
                Err(e) => return self.recover(st, e).await,
            }
        } else {
            let Some(oldest) = st.backlog.front() else {
                return Ok(());
            };
            if !now && Instant::now() < st.resend_at {
                return Ok(());
            }
            let window = self
                .live
                .settings
                .duplicate_window
                .min(self.live.settings.max_age);
            if oldest.created.elapsed() > window / 2 {
                return Err(LiveError::Nats(
                    "lost messages could not be sent again within the duplicate window".into(),
                ));
            }
            if !self.live.is_connected() {
                st.resend_later();
                return Ok(());
            }
            let oldest = st.backlog.pop_front().expect("non-empty");
            let sent = match self.transmit(st, oldest).await {
                Ok(()) if now => st.in_flight.wait_oldest().await,
                sent => sent,
            };
            if let Err(e) = sent {
                return self.recover(st, e).await;
            }
            if !st.in_flight.is_empty() {
                return Ok(()); // its outcome is learned at the next message
            }
        }
        st.resend_backoff = RESEND_BACKOFF.0;
        tracing::info!(run = %self.run_id, messages = st.backlog.len(), "live output acknowledged again; sending the rest");
        while let Some(msg) = st.backlog.pop_front() {
            if let Err(e) = self.transmit(st, msg).await {
                return self.recover(st, e).await;
            }
        }
        Ok(())
    }

    /// Everything numbered so far stored in order, trying the backlog a few times (backing
    /// off in between). [`LiveError::Behind`] when messages are still to be sent again.
    async fn drain(&self, st: &mut State) -> Result<(), LiveError> {
        for round in 1..=DRAIN_ROUNDS {
            self.resend(st, true).await?;
            if st.backlog.is_empty() {
                match st.in_flight.settle().await {
                    Verdict::Stored => return Ok(()),
                    Verdict::Gap(why) => return Err(LiveError::Nats(why)),
                    Verdict::Resend(lost, error) => {
                        tracing::debug!(run = %self.run_id, %error, "live output not acknowledged");
                        st.requeue(lost);
                    }
                }
            }
            if round < DRAIN_ROUNDS {
                tokio::time::sleep_until(st.resend_at).await;
            }
        }
        Err(LiveError::Behind(st.backlog.len()))
    }

    /// Purges this attempt's subject and the older attempts' ones (awaited), then publishes
    /// `reset` on a re-run. Whatever was in flight or waiting is dropped: it is gone with the
    /// purge. With `republish` (a rewind or a repair) the output starts a new generation and
    /// every kept chunk is published again. All or nothing: Err leaves the output broken.
    async fn restart(&self, st: &mut State, republish: bool) -> Result<(), LiveError> {
        st.in_flight.clear();
        st.backlog.clear();
        st.end_queued = false;
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
            self.publish_whole(st, "reset", Bytes::new()).await?;
            let Verdict::Stored = st.in_flight.settle().await else {
                return Err(LiveError::Nats("reset not stored".into()));
            };
            if republish {
                // Stale publishes of the earlier generation that still landed between the purge
                // and the reset go too; any landing later are dropped by attachers (generation).
                let reset_at = st.in_flight.last_stored();
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
                self.publish_whole(st, "chunk", Bytes::from(chunk)).await?;
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
            st.repair_at = Instant::now() + st.repair_backoff;
        }
        st.broken = true;
        st.in_flight.clear();
        st.backlog.clear();
    }

    /// During the run, a broken output is republished once its wait is over and the client is
    /// connected (a failure waits longer, up to a bound).
    async fn repair_when_due(&self, st: &mut State) {
        if Instant::now() < st.repair_at || !self.live.is_connected() {
            return;
        }
        match self.restart(st, true).await {
            Ok(()) => {
                st.broken = false;
                st.repair_backoff = REPAIR_BACKOFF.0;
                tracing::info!(run = %self.run_id, "live output republished");
            }
            Err(e) => {
                crate::latency::PUBLISH_ERRORS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(run = %self.run_id, error = %e, "live output not republished yet");
                st.in_flight.clear();
                st.repair_backoff = (st.repair_backoff * 2).min(REPAIR_BACKOFF.1);
                st.repair_at = Instant::now() + st.repair_backoff;
            }
        }
    }

    /// Makes the subject hold this attempt's output so far: republishes a broken output, sends
    /// lost messages again, awaits every ack.
    async fn settle(&self, st: &mut State) -> Result<(), LiveError> {
        if st.broken {
            self.restart(st, true).await?;
            st.broken = false;
        } else if !st.started && self.epoch > 1 {
            // nothing emitted by this attempt, but an earlier one may have: clear it
            self.restart(st, false).await?;
        }
        self.drain(st).await
    }
}

impl ChunkSink for ChunkPublisher {
    fn emit(&self, chunk: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            st.chunks.push(chunk.clone());
            if st.broken {
                // the republish carries this chunk with the others
                self.repair_when_due(&mut st).await;
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
            match self.settle(&mut st).await {
                // still to be sent again: the end's publish goes on trying
                Ok(()) | Err(LiveError::Behind(_)) => {}
                Err(e) => self.broke(&mut st, e),
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

    /// Settles the output (repairing it if needed), then publishes the end (once: a retry
    /// sends the same end again) and awaits every ack.
    async fn publish_end(&self, kind: &'static str, body: Bytes) -> Result<(), LiveError> {
        let mut st = self.state.lock().await;
        let result = async {
            if !st.end_queued {
                self.settle(&mut st).await?;
                self.publish(&mut st, kind, body).await?;
                st.end_queued = true;
            }
            self.drain(&mut st).await
        }
        .await;
        if let Err(e) = &result {
            if !matches!(e, LiveError::Behind(_)) {
                // nothing to send again in place: the next try republishes the output and its end
                st.broken = true;
                st.end_queued = false;
                st.in_flight.clear();
                st.backlog.clear();
            }
            tracing::debug!(run = %self.run_id, error = %e, "end not published");
        }
        result
    }
}
