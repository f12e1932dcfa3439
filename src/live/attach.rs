//! Attach: reads a run's subject and produces the attach protocol's events, in order, into a
//! bounded channel (the client's buffer).
//!
//! Rules:
//! - messages older than the run's claim epoch at attach time, or than the newest (epoch,
//!   generation) seen, are a superseded attempt's (a zombie's) or a republished generation's,
//!   and are dropped;
//! - every event's id is the JetStream stream sequence of the message (synthetic events carry
//!   the last sequence delivered), so `Last-Event-ID` resumes right after it;
//! - a `Last-Event-ID` above the stream's last sequence was never issued by this stream (it
//!   comes from another one, or from before the stream was recreated): the client gets `reset`
//!   (id 0) and the whole output, as if it attached afresh after clearing what it rendered;
//! - when NATS is unavailable the client gets one `unavailable` event, then either the live
//!   stream again (resumed where it left off) or, once the run has ended, the end event built
//!   from Postgres;
//! - a run that ended without an end message on its subject (chunks expired, NATS was down at
//!   the end) gets the end event from Postgres.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use deadpool_postgres::Pool;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{header, LiveOutput};
use crate::db::runs::{self, Run};

/// One event of the attach protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachEvent {
    pub id: u64,
    /// `chunk`, `reset`, `done`, `failed`, `cancelled` or `unavailable`.
    pub kind: &'static str,
    pub data: String,
}

impl AttachEvent {
    pub fn is_end(&self) -> bool {
        matches!(self.kind, "done" | "failed" | "cancelled")
    }
}

/// How long a run may be finished in Postgres without its end message arriving before the end
/// event is built from Postgres.
const END_GRACE: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(250);
/// Most messages one pull of an attacher's consumer asks for.
const ATTACH_PULL_BATCH: i64 = 64;

// Every attacher is a task whose future is as large as its largest await point, even while it
// idles. The NATS and Postgres calls with large futures are boxed, so they cost memory only while
// they run: an idle attacher's producer is 2 KB instead of 10 KB.

/// Produces the events of `run_id` after stream sequence `after` into `tx` until the end event
/// or until the client goes away (the channel closes).
pub async fn produce(
    live: Arc<LiveOutput>,
    pool: Pool,
    run: Run,
    after: u64,
    tx: mpsc::Sender<AttachEvent>,
) {
    let mut a = Attacher {
        subjects: live.run_subjects(&run.id, run.enqueue_seq),
        live,
        pool,
        run_id: run.id.clone(),
        last_seq: after,
        fresh: after == 0,
        current: (run.claim_epoch, 0),
        tx,
    };
    a.run(run).await;
}

struct Attacher {
    live: Arc<LiveOutput>,
    pool: Pool,
    run_id: String,
    /// The wildcard over the subjects of every attempt of the run.
    subjects: String,
    /// Stream sequence of the last message handed to the client (or skipped).
    last_seq: u64,
    /// The client has no output yet (no Last-Event-ID, nothing sent): a `reset` means nothing
    /// to it and is not sent.
    fresh: bool,
    /// (claim epoch, output generation) of the newest output seen; older messages are a
    /// superseded attempt's or a republished generation's, and are dropped.
    current: (i64, u64),
    tx: mpsc::Sender<AttachEvent>,
}

enum Next {
    /// The end event was sent, or the client left.
    Done,
    /// NATS failed; wait for it or for the run's end.
    Unavailable(String),
}

impl Attacher {
    async fn run(&mut self, run: Run) {
        if !Box::pin(self.forget_an_id_never_issued()).await {
            return;
        }
        // A finished run with nothing on its subject: the chunks expired (or were never
        // published). The end event comes from Postgres at once.
        if run.is_terminal() && Box::pin(self.subject_is_empty()).await == Some(true) {
            Box::pin(self.send_end_from(&run)).await;
            return;
        }
        loop {
            let reason = match Box::pin(self.stream_live()).await {
                Next::Done => return,
                Next::Unavailable(reason) => reason,
            };
            tracing::debug!(run = %self.run_id, %reason, "attach: live output unavailable");
            let event = AttachEvent {
                id: self.last_seq,
                kind: "unavailable",
                data: format!("live output is unavailable ({reason}); the end of the run will still be delivered"),
            };
            if self.tx.send(event).await.is_err() {
                return;
            }
            // Wait for NATS to come back, or for the run to end.
            loop {
                tokio::time::sleep(TICK * 2).await; // poll interval while NATS is down
                if self.tx.is_closed() {
                    return;
                }
                if let Some(run) = Box::pin(self.finished_run()).await {
                    if !self.live.is_connected() {
                        Box::pin(self.send_end_from(&run)).await;
                        return;
                    }
                }
                if self.live.is_connected() && Box::pin(self.live.ensure_stream()).await.is_ok() {
                    break;
                }
            }
        }
    }

    /// When the client's `Last-Event-ID` is above the stream's last sequence, sends `reset` and
    /// starts from the beginning (see the module docs). Unchecked while NATS does not answer:
    /// the client then still gets the end (from Postgres once the run has ended). False when
    /// the client left.
    async fn forget_an_id_never_issued(&mut self) -> bool {
        if self.last_seq == 0 {
            return true;
        }
        let Ok(stream) = Box::pin(self.live.ensure_stream()).await else {
            return true;
        };
        let last =
            match tokio::time::timeout(self.live.settings.op_timeout, stream.get_info()).await {
                Ok(Ok(info)) => info.state.last_sequence,
                _ => return true,
            };
        if self.last_seq <= last {
            return true;
        }
        tracing::debug!(run = %self.run_id, id = self.last_seq, last, "attach: Last-Event-ID was never issued; starting over");
        self.last_seq = 0;
        self.fresh = false;
        let reset = AttachEvent {
            id: 0,
            kind: "reset",
            data: String::new(),
        };
        self.tx.send(reset).await.is_ok()
    }

    async fn subject_is_empty(&self) -> Option<bool> {
        let stream = Box::pin(self.live.ensure_stream()).await.ok()?;
        match tokio::time::timeout(
            self.live.settings.op_timeout,
            stream.get_last_raw_message_by_subject(&self.subjects),
        )
        .await
        {
            Ok(Ok(_)) => Some(false),
            Ok(Err(e)) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Some(true),
            _ => None,
        }
    }

    /// True when nothing on the subject is newer than what this client was handed (a slow
    /// client still has messages coming, and must get them before any synthetic end).
    async fn caught_up(&self) -> bool {
        let Ok(stream) = Box::pin(self.live.ensure_stream()).await else {
            return false;
        };
        match tokio::time::timeout(
            self.live.settings.op_timeout,
            stream.get_last_raw_message_by_subject(&self.subjects),
        )
        .await
        {
            Ok(Ok(last)) => last.sequence <= self.last_seq,
            Ok(Err(e)) => matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound),
            Err(_) => false,
        }
    }

    async fn finished_run(&self) -> Option<Run> {
        let client = self.pool.get().await.ok()?;
        runs::get_run(&client, &self.run_id)
            .await
            .ok()
            .flatten()
            .filter(Run::is_terminal)
    }

    async fn send_end_from(&mut self, run: &Run) {
        let (kind, data) = match run.status.as_str() {
            "succeeded" => ("done", run.output.clone().unwrap_or(Value::Null)),
            "cancelled" => ("cancelled", run.error.clone().unwrap_or(Value::Null)),
            _ => ("failed", run.error.clone().unwrap_or(Value::Null)),
        };
        let _ = self
            .tx
            .send(AttachEvent {
                id: self.last_seq,
                kind,
                data: data.to_string(),
            })
            .await;
    }

    /// Delivers messages as they arrive until the end event, the client leaving, or a NATS
    /// failure.
    async fn stream_live(&mut self) -> Next {
        let stream = match Box::pin(self.live.ensure_stream()).await {
            Ok(s) => s,
            Err(e) => return Next::Unavailable(e.to_string()),
        };
        let config = OrderedConfig {
            filter_subject: self.subjects.clone(),
            deliver_policy: if self.last_seq == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: self.last_seq.saturating_add(1),
                }
            },
            // Each pull asks for at most this many messages, so an attacher buffers at most about
            // one batch however far behind its client is (the default, 500, made 1,000 attachers
            // of one run hold about 0.8 GB).
            max_batch: ATTACH_PULL_BATCH,
            ..Default::default()
        };
        let consumer = match tokio::time::timeout(
            self.live.settings.op_timeout,
            Box::pin(stream.create_consumer(config)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Next::Unavailable(e.to_string()),
            Err(_) => return Next::Unavailable("timed out creating a consumer".into()),
        };
        let mut messages = match Box::pin(consumer.messages()).await {
            Ok(m) => m,
            Err(e) => return Next::Unavailable(e.to_string()),
        };
        let mut last_message_at = Instant::now();
        let mut finished_seen: Option<Instant> = None;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let message = match message {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Next::Unavailable(e.to_string()),
                        None => return Next::Unavailable("consumer closed".into()),
                    };
                    last_message_at = Instant::now();
                    let Ok(info) = message.info() else { continue };
                    let seq = info.stream_sequence;
                    if seq <= self.last_seq {
                        continue;
                    }
                    self.last_seq = seq;
                    let Some(event) = self.event_of(seq, &message) else { continue };
                    if event.kind == "reset" && self.fresh {
                        continue;
                    }
                    self.fresh = false;
                    let end = event.is_end();
                    if self.tx.send(event).await.is_err() || end {
                        return Next::Done;
                    }
                }
                _ = tick.tick() => {
                    if self.tx.is_closed() {
                        return Next::Done;
                    }
                    if !self.live.is_connected() {
                        return Next::Unavailable("NATS disconnected".into());
                    }
                    if let Some(run) = Box::pin(self.finished_run()).await {
                        let since = *finished_seen.get_or_insert_with(Instant::now);
                        if Instant::now().duration_since(since.max(last_message_at)) > END_GRACE
                            && Box::pin(self.caught_up()).await
                        {
                            // finished, every message delivered, and the end message is not
                            // coming (it expired, or NATS was down at the end)
                            Box::pin(self.send_end_from(&run)).await;
                            return Next::Done;
                        }
                    }
                }
            }
        }
    }

    /// Turns a message into an event, or `None` for a superseded attempt's message.
    fn event_of(
        &mut self,
        seq: u64,
        message: &async_nats::jetstream::Message,
    ) -> Option<AttachEvent> {
        let headers = message.headers.as_ref()?;
        let kind = headers.get(header::KIND)?.as_str();
        let epoch: i64 = headers.get(header::EPOCH)?.as_str().parse().ok()?;
        let gen: u64 = headers
            .get(header::GEN)
            .and_then(|g| g.as_str().parse().ok())
            .unwrap_or(0);
        if (epoch, gen) < self.current {
            return None;
        }
        self.current = (epoch, gen);
        let kind = match kind {
            "chunk" => "chunk",
            "reset" => "reset",
            "done" => "done",
            "failed" => "failed",
            "cancelled" => "cancelled",
            _ => return None,
        };
        Some(AttachEvent {
            id: seq,
            kind,
            data: String::from_utf8_lossy(&message.payload).into_owned(),
        })
    }
}
