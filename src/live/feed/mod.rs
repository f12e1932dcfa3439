//! Fan-out of live output: per process, one reader per attached run, shared by every local
//! attacher of that run.
//!
//! A [`Feed`] is one ordered JetStream consumer over the run's attempts' subjects, started at
//! the position of the attacher that created it. What it reads goes into a bounded window of
//! recent messages (at most [`WINDOW_MESSAGES`] and about [`WINDOW_BYTES`]); attachers read the
//! window at their own positions (see `attach`). Every message with a stream sequence above the
//! window's `base` is in the window, so an attacher at or above `base` is served from memory; one
//! below it (a late attacher of a long run, a resume from far back) first catches up with direct
//! gets of the stream, without a consumer of its own.
//!
//! The end of a run is learned once per process: the end message on the stream, or, when that
//! never comes (NATS was down at the end, the output expired), one shared watcher that asks
//! Postgres every [`TICK`] which of the attached runs have ended — one statement for all of them,
//! on the API's pool — and puts the end built from Postgres into the feed.
//!
//! A feed lives while an attacher holds it: the last one to leave drops it, which stops its
//! reader and deletes its consumer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::stream;
use async_nats::HeaderMap;
use bytes::Bytes;
use deadpool_postgres::Pool;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

pub use super::parts::{Assembler, Piece};

mod ends;
use super::{header, LiveOutput};
use crate::db::runs::Run;
use ends::{last_message, watch_ends};

/// Messages a feed keeps for attachers behind its reader.
pub const WINDOW_MESSAGES: usize = 4096;
/// Payload bytes a feed keeps (at least one message is always kept).
pub const WINDOW_BYTES: usize = 4 << 20;
/// Interval of the shared end watcher and of a reader's connection check.
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Most messages one pull of a feed's consumer asks for.
const PULL_BATCH: i64 = 256;
/// Longest pull of a feed's consumer; the server sends an idle heartbeat every half of it. A
/// consumer whose NATS node died is noticed after two missed heartbeats and made again (at
/// async-nats's default of 30 s, an attacher waited about that long after a node's death).
const PULL_EXPIRES: Duration = Duration::from_secs(4);

/// One message of a run's output, decoded once and shared by every attacher.
#[derive(Debug)]
pub struct Msg {
    /// JetStream stream sequence; for an end built from Postgres, the last sequence read.
    pub seq: u64,
    /// `chunk`, `reset`, `done`, `failed` or `cancelled`.
    pub kind: &'static str,
    pub epoch: i64,
    pub gen: u64,
    /// The publisher's sequence numbers (`Spool-Seq`) of the message's first and last part:
    /// consecutive within an attempt, so a reader can tell a message that follows a lost one.
    pub pub_seq: Option<(u64, u64)>,
    pub data: Bytes,
}

impl Msg {
    pub fn is_end(&self) -> bool {
        matches!(self.kind, "done" | "failed" | "cancelled")
    }

    /// Decodes a message of a run's subject; `None` for anything Spool did not publish.
    pub fn decode(seq: u64, headers: Option<&HeaderMap>, payload: &Bytes) -> Option<Msg> {
        let headers = headers?;
        let kind = match headers.get(header::KIND)?.as_str() {
            "chunk" => "chunk",
            "reset" => "reset",
            "done" => "done",
            "failed" => "failed",
            "cancelled" => "cancelled",
            _ => return None,
        };
        let epoch: i64 = headers.get(header::EPOCH)?.as_str().parse().ok()?;
        let gen: u64 = headers
            .get(header::GEN)
            .and_then(|g| g.as_str().parse().ok())
            .unwrap_or(0);
        let pub_seq = headers
            .get(header::SEQ)
            .and_then(|s| s.as_str().parse().ok())
            .map(|s| (s, s));
        Some(Msg {
            seq,
            kind,
            epoch,
            gen,
            pub_seq,
            data: payload.clone(),
        })
    }

    /// The end event of a finished run, from its row.
    fn end_from(run: &Run, seq: u64) -> Msg {
        let (kind, data) = match run.status.as_str() {
            "succeeded" => ("done", run.output.clone().unwrap_or(Value::Null)),
            "cancelled" => ("cancelled", run.error.clone().unwrap_or(Value::Null)),
            _ => ("failed", run.error.clone().unwrap_or(Value::Null)),
        };
        Msg {
            seq,
            kind,
            epoch: i64::MAX,
            gen: u64::MAX,
            pub_seq: None,
            data: Bytes::from(data.to_string()),
        }
    }
}

/// What an attacher at some position gets from a feed.
pub enum Read {
    /// Messages after the position, in stream order.
    Messages(Vec<Arc<Msg>>),
    /// The position is below the window: catch up from the stream up to `base` first.
    Behind { base: u64 },
    /// Nothing after the position yet. `end` is set once the run's end is known without an end
    /// message to read (built from Postgres); `outage` is the count and reason of NATS outages
    /// while one is going on.
    Idle {
        end: Option<Arc<Msg>>,
        outage: Option<(u64, String)>,
    },
}

type FeedKey = (String, i64);

/// Every feed of the process, and the shared end watcher.
#[derive(Default)]
pub struct Feeds {
    feeds: Mutex<HashMap<FeedKey, Weak<Feed>>>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Feeds {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.lock().unwrap().take() {
            w.abort();
        }
    }
}

impl Feeds {
    /// The feed of `run`, created (reading from `after`) if no attacher of this process holds
    /// one.
    pub fn feed(&self, live: &Arc<LiveOutput>, pool: &Pool, run: &Run, after: u64) -> Arc<Feed> {
        let key = (run.id.clone(), run.enqueue_seq);
        let mut feeds = self.feeds.lock().unwrap();
        if let Some(feed) = feeds.get(&key).and_then(Weak::upgrade) {
            return feed;
        }
        feeds.retain(|_, f| f.strong_count() > 0);
        let feed = Feed::start(live, run, after);
        feeds.insert(key, Arc::downgrade(&feed));
        drop(feeds);
        let mut watcher = self.watcher.lock().unwrap();
        if watcher.is_none() {
            *watcher = Some(tokio::spawn(watch_ends(Arc::downgrade(live), pool.clone())));
        }
        feed
    }

    /// Feeds alive right now (one JetStream consumer each).
    pub fn count(&self) -> usize {
        let feeds = self.feeds.lock().unwrap();
        feeds.values().filter(|f| f.strong_count() > 0).count()
    }

    fn waiting_for_end(&self) -> Vec<Arc<Feed>> {
        let mut feeds = self.feeds.lock().unwrap();
        feeds.retain(|_, f| f.strong_count() > 0);
        feeds
            .values()
            .filter_map(Weak::upgrade)
            .filter(|f| !f.state.lock().unwrap().has_end)
            .collect()
    }
}

/// One run's shared reader and window.
pub struct Feed {
    run_id: String,
    enqueue_seq: i64,
    subjects: String,
    state: Mutex<FeedState>,
    changed: watch::Sender<()>,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The reader's consumer (named, so that re-creations keep the name), deleted when the feed
    /// goes instead of lingering on the server for its inactivity threshold.
    consumer: Mutex<Option<(stream::Stream, String)>>,
}

struct FeedState {
    window: VecDeque<Arc<Msg>>,
    window_bytes: usize,
    /// Every message of the run above this stream sequence is in the window.
    base: u64,
    /// Stream sequence of the last message read (`base` before the first).
    read_to: u64,
    last_message_at: Instant,
    /// When the shared watcher first saw the run finished in Postgres.
    finished_seen: Option<Instant>,
    /// An end message was read, or the end was built from Postgres.
    has_end: bool,
    /// The end built from Postgres (an end message read is in the window instead).
    end: Option<Arc<Msg>>,
    /// The last end message read.
    end_read: Option<Arc<Msg>>,
    outages: u64,
    unavailable: Option<String>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(r) = self.reader.lock().unwrap().take() {
            r.abort();
        }
        let consumer = self.consumer.lock().unwrap().take();
        if let (Some((stream, name)), Ok(rt)) = (consumer, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let delete = stream.delete_consumer(&name);
                let _ = tokio::time::timeout(Duration::from_secs(2), delete).await;
            });
        }
    }
}

impl Feed {
    fn start(live: &Arc<LiveOutput>, run: &Run, after: u64) -> Arc<Feed> {
        let (changed, _) = watch::channel(());
        let feed = Arc::new(Feed {
            run_id: run.id.clone(),
            enqueue_seq: run.enqueue_seq,
            subjects: live.run_subjects(&run.id, run.enqueue_seq),
            state: Mutex::new(FeedState {
                window: VecDeque::new(),
                window_bytes: 0,
                base: after,
                read_to: after,
                last_message_at: Instant::now(),
                finished_seen: None,
                has_end: false,
                end: None,
                end_read: None,
                outages: 0,
                unavailable: None,
            }),
            changed,
            reader: Mutex::new(None),
            consumer: Mutex::new(None),
        });
        let reader = tokio::spawn(read(
            Arc::downgrade(&feed),
            live.clone(),
            run.is_terminal().then(|| run.clone()),
        ));
        *feed.reader.lock().unwrap() = Some(reader);
        feed
    }

    pub fn subjects(&self) -> &str {
        &self.subjects
    }

    /// A receiver that is notified of every change of the feed.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// What an attacher that was handed everything up to stream sequence `pos` gets next (at
    /// most `max` messages).
    pub fn read_after(&self, pos: u64, max: usize) -> Read {
        let st = self.state.lock().unwrap();
        if pos < st.base {
            return Read::Behind { base: st.base };
        }
        let from = st.window.partition_point(|m| m.seq <= pos);
        if from < st.window.len() {
            return Read::Messages(st.window.range(from..).take(max).cloned().collect());
        }
        // A client at or after the end message (it resumes after the end it was sent) gets
        // that end again.
        let end = st
            .end
            .clone()
            .or_else(|| st.end_read.clone().filter(|e| e.seq <= pos));
        Read::Idle {
            end,
            outage: st.unavailable.clone().map(|reason| (st.outages, reason)),
        }
    }

    fn notify(&self) {
        self.changed.send_replace(());
    }

    fn push(&self, msg: Msg) {
        {
            let mut st = self.state.lock().unwrap();
            if msg.seq <= st.read_to {
                return;
            }
            st.read_to = msg.seq;
            st.last_message_at = Instant::now();
            st.has_end |= msg.is_end();
            st.window_bytes += msg.data.len();
            let msg = Arc::new(msg);
            if msg.is_end() {
                st.end_read = Some(msg.clone());
            }
            st.window.push_back(msg);
            while st.window.len() > 1
                && (st.window.len() > WINDOW_MESSAGES || st.window_bytes > WINDOW_BYTES)
            {
                let old = st.window.pop_front().expect("non-empty");
                st.window_bytes -= old.data.len();
                st.base = old.seq;
            }
        }
        self.notify();
    }

    fn set_unavailable(&self, reason: String) {
        {
            let mut st = self.state.lock().unwrap();
            if st.unavailable.is_some() {
                return;
            }
            st.outages += 1;
            st.unavailable = Some(reason);
        }
        self.notify();
    }

    fn set_available(&self) {
        let was = self.state.lock().unwrap().unavailable.take();
        if was.is_some() {
            self.notify();
        }
    }
}

/// Why a feed's reader stopped reading.
enum Interruption {
    /// NATS failed (the reason): attachers are told the live output is unavailable.
    Outage(String),
    /// The client reconnected, maybe to another node of a cluster: the consumer may have been
    /// on the node that went away, so it is made again at once, where the reader left off.
    Reconnected,
}

/// A feed's reader: one ordered consumer from the feed's position on, re-created after a NATS
/// failure or a reconnection from where it left off.
async fn read(feed: Weak<Feed>, live: Arc<LiveOutput>, ended: Option<Run>) {
    // A run that had ended when it was attached, with nothing on its subjects (its chunks
    // expired, or were never published), or whose end message is at or before the position
    // attached from (a client resuming after the end it was sent): its end comes from Postgres
    // at once.
    if let Some(run) = ended {
        let Some(f) = feed.upgrade() else { return };
        let after = f.state.lock().unwrap().read_to;
        match last_message(&live, &f.subjects).await {
            Some(None) => f.set_end_from(&run),
            Some(Some((seq, true))) if seq <= after => f.set_end_from(&run),
            _ => {}
        }
    }
    let mut parts = Assembler::default();
    loop {
        let Some(f) = feed.upgrade() else { return };
        let subjects = f.subjects.clone();
        let from = f.state.lock().unwrap().read_to;
        drop(f);
        let reason = match Box::pin(consume(&feed, &live, &mut parts, subjects, from)).await {
            None => return,
            Some(Interruption::Reconnected) => {
                // (the consumer left behind goes by itself: ordered consumers are ephemeral)
                tracing::debug!("attach: NATS reconnected; reading on with a new consumer");
                continue;
            }
            Some(Interruption::Outage(reason)) => reason,
        };
        let Some(f) = feed.upgrade() else { return };
        tracing::debug!(run = %f.run_id, %reason, "attach: live output unavailable");
        f.set_unavailable(reason);
        drop(f);
        // Wait for NATS to come back (the shared watcher ends the feed meanwhile if the run
        // ends).
        loop {
            tokio::time::sleep(TICK * 2).await; // poll interval while NATS is down
            if feed.strong_count() == 0 {
                return;
            }
            if live.is_connected() && Box::pin(live.ensure_stream()).await.is_ok() {
                break;
            }
        }
    }
}

/// Reads messages into the feed until NATS fails or reconnects, or the feed is gone (`None`).
async fn consume(
    feed: &Weak<Feed>,
    live: &LiveOutput,
    parts: &mut Assembler,
    subjects: String,
    after: u64,
) -> Option<Interruption> {
    let outage = |reason: String| Some(Interruption::Outage(reason));
    let stream = match live.ensure_stream().await {
        Ok(s) => s,
        Err(e) => return outage(e.to_string()),
    };
    let connects = || live.client.statistics().connects.load(Ordering::Relaxed);
    let connected = connects();
    let name = format!("spool-feed-{}", uuid::Uuid::new_v4().simple());
    let config = OrderedConfig {
        name: Some(name.clone()),
        filter_subject: subjects,
        deliver_policy: if after == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: after.saturating_add(1),
            }
        },
        max_batch: PULL_BATCH,
        max_expires: PULL_EXPIRES,
        ..Default::default()
    };
    let consumer = match tokio::time::timeout(
        live.settings.op_timeout,
        stream.create_consumer(config),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return outage(e.to_string()),
        Err(_) => return outage("timed out creating a consumer".into()),
    };
    let mut messages = match consumer.messages().await {
        Ok(m) => m,
        Err(e) => return outage(e.to_string()),
    };
    if let Some(f) = feed.upgrade() {
        *f.consumer.lock().unwrap() = Some((stream.clone(), name));
        f.set_available();
    }
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            message = messages.next() => {
                let message = match message {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return outage(e.to_string()),
                    None => return outage("consumer closed".into()),
                };
                let f = feed.upgrade()?;
                let Ok(info) = message.info() else { continue };
                let seq = info.stream_sequence;
                match parts.add(&message.subject, seq, message.headers.as_ref(), &message.payload) {
                    Piece::Whole(msg) => f.push(msg),
                    Piece::Part | Piece::Dropped => f.skip(seq),
                }
            }
            _ = tick.tick() => {
                if feed.strong_count() == 0 {
                    return None;
                }
                if !live.is_connected() {
                    return outage("NATS disconnected".into());
                }
                if connects() != connected {
                    return Some(Interruption::Reconnected);
                }
            }
        }
    }
}

impl Feed {
    /// A message attachers are not shown (not Spool's, or a part of one): only the reader's
    /// position moves.
    fn skip(&self, seq: u64) {
        let mut st = self.state.lock().unwrap();
        st.read_to = st.read_to.max(seq);
    }
}
