//! Attach: one client's view of a run's live output, read from the run's shared [`Feed`] at the
//! client's own position, as the attach protocol's events.
//!
//! Rules:
//! - messages older than the run's claim epoch at attach time, or than the newest (epoch,
//!   generation) this client was handed, are a superseded attempt's (a zombie's) or a
//!   republished generation's, and are dropped;
//! - a generation is shown only while its messages follow each other (the publisher numbers
//!   an attempt's messages, `Spool-Seq`): a message that does not follow the last one shown, or
//!   a generation that does not start at its beginning, comes after a lost message (a NATS node
//!   died with it), and the rest of that generation is hidden. The publisher learns of the loss
//!   (the message was not acknowledged) and sends the output again: the lost message again in
//!   place when nothing after it was stored, otherwise as a newer generation (`reset`, every
//!   chunk again). A resuming client's position is looked up on the stream to know what follows
//!   it;
//! - every event's id is the JetStream stream sequence of the message (synthetic events carry
//!   the last sequence delivered), so `Last-Event-ID` resumes right after it;
//! - a `Last-Event-ID` above the stream's last sequence was never issued by this stream (it
//!   comes from another one, or from before the stream was recreated): the client gets `reset`
//!   (id 0) and the whole output, as if it attached afresh after clearing what it rendered;
//! - when NATS is unavailable the client gets one `unavailable` event per outage, then either
//!   the live stream again (resumed where it left off) or, once the run has ended, the end
//!   event built from Postgres;
//! - a run that ended without an end message on its subjects (chunks expired, NATS was down at
//!   the end) gets the end event from Postgres.
//!
//! A client costs no task, no channel and no consumer: its events are a stream polled by its
//! response, reading the feed's window (or, below the window, the stream by direct get).

use std::collections::VecDeque;
use std::sync::Arc;

use async_nats::jetstream::stream::DirectGetErrorKind;
use deadpool_postgres::Pool;
use futures::Stream;
use tokio::sync::{mpsc, watch};

use super::feed::{Assembler, Feed, Msg, Piece, Read, TICK};
use super::LiveOutput;
use crate::db::runs::Run;

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

/// Messages an attacher takes from the window at a time.
const READ_BATCH: usize = 32;

/// The events of `run_id` after stream sequence `after`, until the end event.
pub fn events(
    live: Arc<LiveOutput>,
    pool: Pool,
    run: Run,
    after: u64,
) -> impl Stream<Item = AttachEvent> + Send + 'static {
    enum Step {
        Start(Box<(Arc<LiveOutput>, Pool, Run, u64)>),
        Attached(Box<Attacher>),
    }
    let start = Step::Start(Box::new((live, pool, run, after)));
    futures::stream::unfold(start, |step| async move {
        let mut a = match step {
            Step::Start(start) => {
                let (live, pool, run, after) = *start;
                let (after, reset) = match Box::pin(an_id_never_issued(&live, after)).await {
                    true => (0, true),
                    false => (after, false),
                };
                let a = Box::new(Attacher::new(live, &pool, &run, after));
                if reset {
                    let event = AttachEvent {
                        id: 0,
                        kind: "reset",
                        data: String::new(),
                    };
                    return Some((event, Step::Attached(a)));
                }
                a
            }
            Step::Attached(a) => a,
        };
        let event = a.next().await?;
        Some((event, Step::Attached(a)))
    })
}

/// Produces the events of `run_id` after stream sequence `after` into `tx` until the end event
/// or until the receiver goes away.
pub async fn produce(
    live: Arc<LiveOutput>,
    pool: Pool,
    run: Run,
    after: u64,
    tx: mpsc::Sender<AttachEvent>,
) {
    use futures::StreamExt;
    let mut events = std::pin::pin!(events(live, pool, run, after));
    while let Some(event) = events.next().await {
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

/// True when a `Last-Event-ID` is above the stream's last sequence (see the module docs).
/// Unchecked (false) while NATS does not answer: the client then still gets the end (from
/// Postgres once the run has ended).
async fn an_id_never_issued(live: &LiveOutput, after: u64) -> bool {
    if after == 0 {
        return false;
    }
    let Ok(stream) = live.ensure_stream().await else {
        return false;
    };
    let last = match tokio::time::timeout(live.settings.op_timeout, stream.get_info()).await {
        Ok(Ok(info)) => info.state.last_sequence,
        _ => return false,
    };
    if after > last {
        tracing::debug!(
            id = after,
            last,
            "attach: Last-Event-ID was never issued; starting over"
        );
        return true;
    }
    false
}

struct Attacher {
    live: Arc<LiveOutput>,
    feed: Arc<Feed>,
    changed: watch::Receiver<()>,
    /// Stream sequence of the last message handed to the client (or skipped).
    last_seq: u64,
    /// The client has no output yet (no Last-Event-ID, nothing sent): a `reset` means nothing
    /// to it and is not sent.
    fresh: bool,
    /// (claim epoch, output generation) of the newest output handed out; older messages are a
    /// superseded attempt's or a republished generation's, and are dropped.
    current: (i64, u64),
    /// NATS outages of the feed this client was told about.
    outages_told: u64,
    /// Catching up below the window (or looking up the resume position) failed and the client
    /// was told (`unavailable`).
    catch_up_failed: bool,
    /// Where the client is in the current generation's numbered messages.
    continuity: Continuity,
    buffered: VecDeque<Arc<Msg>>,
    /// Messages in parts read below the window.
    parts: Assembler,
    done: bool,
}

/// Where a client is in the publisher's numbering (`Spool-Seq`) of the current generation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Continuity {
    /// Resuming after this stream sequence: the message there tells what follows it.
    Resume(u64),
    /// Nothing of the current generation shown: only its beginning may come (a `reset`, or the
    /// attempt's first message).
    Beginning,
    /// The next message shown must start with this `Spool-Seq`.
    Next(u64),
    /// A message of the current generation was lost: the rest of it is hidden.
    Broken,
}

/// What a direct get below the window found.
enum CatchUp {
    Message(Msg),
    /// A message attachers are not shown: only the position moves.
    Skip(u64),
    /// Nothing on the stream after the position.
    Exhausted,
}

impl Attacher {
    fn new(live: Arc<LiveOutput>, pool: &Pool, run: &Run, after: u64) -> Self {
        let feed = live.feeds.feed(&live, pool, run, after);
        Self {
            changed: feed.subscribe(),
            feed,
            live,
            last_seq: after,
            fresh: after == 0,
            current: (run.claim_epoch, 0),
            outages_told: 0,
            catch_up_failed: false,
            continuity: match after {
                0 => Continuity::Beginning,
                after => Continuity::Resume(after),
            },
            buffered: VecDeque::new(),
            parts: Assembler::default(),
            done: false,
        }
    }

    async fn next(&mut self) -> Option<AttachEvent> {
        loop {
            if self.done {
                return None;
            }
            if let Continuity::Resume(at) = self.continuity {
                match Box::pin(self.resume_at(at)).await {
                    Ok(c) => {
                        self.catch_up_failed = false;
                        self.continuity = c;
                    }
                    Err(reason) if !self.catch_up_failed => {
                        self.catch_up_failed = true;
                        return Some(self.unavailable(&reason));
                    }
                    Err(_) => tokio::time::sleep(TICK * 2).await, // poll while NATS is down
                }
                continue;
            }
            if let Some(m) = self.buffered.pop_front() {
                if let Some(event) = self.hand_out(&m) {
                    return Some(event);
                }
                continue;
            }
            self.changed.borrow_and_update();
            match self.feed.read_after(self.last_seq, READ_BATCH) {
                Read::Messages(messages) => self.buffered.extend(messages),
                Read::Behind { base } => match Box::pin(self.catch_up()).await {
                    Ok(CatchUp::Message(m)) => {
                        self.catch_up_failed = false;
                        if let Some(event) = self.hand_out(&m) {
                            return Some(event);
                        }
                    }
                    Ok(CatchUp::Skip(seq)) => self.last_seq = seq,
                    // what the window starts after is gone from the stream (purged)
                    Ok(CatchUp::Exhausted) => self.last_seq = base,
                    Err(reason) if !self.catch_up_failed => {
                        self.catch_up_failed = true;
                        return Some(self.unavailable(&reason));
                    }
                    Err(_) => tokio::time::sleep(TICK * 2).await, // poll while NATS is down
                },
                Read::Idle { end: Some(end), .. } => {
                    self.done = true;
                    return Some(AttachEvent {
                        id: self.last_seq.max(end.seq),
                        kind: end.kind,
                        data: String::from_utf8_lossy(&end.data).into_owned(),
                    });
                }
                Read::Idle {
                    end: None,
                    outage: Some((n, reason)),
                } if n > self.outages_told => {
                    self.outages_told = n;
                    return Some(self.unavailable(&reason));
                }
                Read::Idle { .. } => {
                    if self.changed.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// The event for a message at or after the client's position, or `None` when it is
    /// dropped (already handed out, a superseded attempt's, or a `reset` for a fresh client).
    fn hand_out(&mut self, m: &Msg) -> Option<AttachEvent> {
        if m.seq <= self.last_seq {
            return None;
        }
        self.last_seq = m.seq;
        if (m.epoch, m.gen) < self.current {
            return None;
        }
        if (m.epoch, m.gen) > self.current {
            self.current = (m.epoch, m.gen);
            self.continuity = Continuity::Beginning;
        }
        // An end is never withheld (the publisher sends one only once every message before it
        // was acknowledged in order, so it never follows a lost one).
        if !self.follows(m) && !m.is_end() {
            return None;
        }
        if m.kind == "reset" && self.fresh {
            return None;
        }
        self.fresh = false;
        self.done = m.is_end();
        Some(AttachEvent {
            id: m.seq,
            kind: m.kind,
            data: String::from_utf8_lossy(&m.data).into_owned(),
        })
    }

    /// Whether `m`, of the current generation, follows what the client was shown of it; moves
    /// the client's place in the numbering.
    fn follows(&mut self, m: &Msg) -> bool {
        let Some((first, last)) = m.pub_seq else {
            return true; // not numbered: nothing to check
        };
        let follows = match self.continuity {
            Continuity::Beginning => m.kind == "reset" || first == 1,
            Continuity::Next(next) => first == next,
            Continuity::Broken => false,
            Continuity::Resume(_) => true, // looked up before any message is handed out
        };
        if follows {
            self.continuity = Continuity::Next(last + 1);
        } else if self.continuity != Continuity::Broken {
            tracing::debug!(
                seq = m.seq,
                pub_seq = first,
                continuity = ?self.continuity,
                "attach: a message of this generation was lost; hiding the rest of it until it is republished"
            );
            self.continuity = Continuity::Broken;
        }
        follows
    }

    /// What follows the message at stream sequence `at` (a `Last-Event-ID`): the next message
    /// of its generation, or — when it is gone (purged under a newer generation) or older than
    /// the run's current attempt — a generation's beginning.
    async fn resume_at(&mut self, at: u64) -> Result<Continuity, String> {
        let stream = self.live.ensure_stream().await.map_err(|e| e.to_string())?;
        let get = stream.direct_get(at);
        let m = match tokio::time::timeout(self.live.settings.op_timeout, get).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                return Ok(Continuity::Beginning)
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out reading the stream".into()),
        };
        let ours = self
            .feed
            .subjects()
            .strip_suffix('*')
            .is_some_and(|prefix| m.subject.as_str().starts_with(prefix));
        let msg = Msg::decode(m.sequence, Some(&m.headers), &m.payload).filter(|_| ours);
        Ok(match msg {
            Some(msg) if (msg.epoch, msg.gen) >= self.current => {
                self.current = (msg.epoch, msg.gen);
                match msg.pub_seq {
                    Some((_, last)) => Continuity::Next(last + 1),
                    None => Continuity::Beginning,
                }
            }
            _ => Continuity::Beginning,
        })
    }

    fn unavailable(&self, reason: &str) -> AttachEvent {
        AttachEvent {
            id: self.last_seq,
            kind: "unavailable",
            data: format!(
                "live output is unavailable ({reason}); the end of the run will still be delivered"
            ),
        }
    }

    /// The next message after the client's position, read from the stream directly (the client
    /// is below the feed's window); a message in parts is read whole.
    async fn catch_up(&mut self) -> Result<CatchUp, String> {
        let stream = self.live.ensure_stream().await.map_err(|e| e.to_string())?;
        let mut pos = self.last_seq;
        loop {
            let get = stream.direct_get_next_for_subject(self.feed.subjects(), Some(pos + 1));
            let m = match tokio::time::timeout(self.live.settings.op_timeout, get).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                    return Ok(CatchUp::Exhausted)
                }
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out reading the stream".into()),
            };
            match self
                .parts
                .add(&m.subject, m.sequence, Some(&m.headers), &m.payload)
            {
                Piece::Whole(msg) => return Ok(CatchUp::Message(msg)),
                Piece::Dropped => return Ok(CatchUp::Skip(m.sequence)),
                Piece::Part => pos = m.sequence,
            }
        }
    }
}
