//! [`InFlight`]: the messages of one run attempt awaiting JetStream's acknowledgement, in the
//! publisher's order, each kept whole so that it can be sent again under the same
//! `Nats-Msg-Id`.
//!
//! Acknowledgements are learned as they arrive, without blocking a publish on one that is not
//! due; each carries its deadline from the moment its message was sent. The window lets go of
//! the messages stored in order at its front, checking that their stream sequences rise in the
//! publisher's order. Once every outcome is known, [`InFlight::settle`] says what the subject
//! holds:
//! - every message stored, in order: the output is intact;
//! - a message failed (the stream had no leader, a NATS node died with it, its ack timed out):
//!   it and every message after it are to be sent again, in order, with the same ids.
//!   JetStream stores again none that it already holds (within its duplicate window) and acks
//!   it with the sequence it was stored at, so the acks of the resend tell whether the subject
//!   holds the messages in order after all (only acks were lost) or a later message was stored
//!   before a lost one;
//! - stream sequences did not rise: the subject holds a gap or a reordering that no resend
//!   mends (attachers hide what follows a gap), and the output needs a new generation.
//!
//! Never awaited while the attempt's state is unlocked by anyone else; owns no task.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;

use super::LiveError;

/// One message of an attempt, as published (and as published again).
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    /// `Spool-Seq`, and the end of its `Nats-Msg-Id`.
    pub seq: u64,
    pub gen: u64,
    pub kind: &'static str,
    /// `Spool-Part` (i, n) of a message sent in parts.
    pub part: Option<(usize, usize)>,
    pub payload: Bytes,
    /// When it was numbered (about when it was first sent): a resend later than the stream's
    /// duplicate window could store it twice.
    pub created: Instant,
}

/// What the subject holds once every outcome is known.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Every message stored, in order.
    Stored,
    /// The first of these (in order) was not acknowledged: send them all again.
    Resend(Vec<Outgoing>, LiveError),
    /// A message was stored after a later one.
    Gap(String),
}

/// The stream sequence a message was stored at, or why it was not acknowledged.
pub(super) type Outcome = Result<u64, LiveError>;

/// A publish's ack, due within `timeout` from now (not from the first time it is polled).
pub(super) fn ack_within(ack: PublishAckFuture, timeout: Duration) -> BoxFuture<'static, Outcome> {
    let ack = tokio::time::timeout(timeout, ack.into_future());
    async move {
        match ack.await {
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) => Err(LiveError::Nats(e.to_string())),
            Err(_) => Err(LiveError::Timeout(timeout)),
        }
    }
    .boxed()
}

struct Entry {
    msg: Outgoing,
    sent: Instant,
    outcome: Option<Outcome>,
}

/// The attempt's messages awaiting their acknowledgement (see the module docs).
pub(super) struct InFlight {
    /// In publishing order; their `seq`s are consecutive.
    entries: VecDeque<Entry>,
    acks: FuturesUnordered<BoxFuture<'static, (u64, Outcome)>>,
    /// Stream sequence of the last message found stored in order.
    last_stored: u64,
    /// Why the subject no longer holds the attempt's messages in order, once known.
    gap: Option<String>,
    /// Messages in flight across the process (see `publisher::MAX_ACKS_PENDING`).
    total: Arc<AtomicUsize>,
}

impl InFlight {
    pub fn new(total: Arc<AtomicUsize>) -> Self {
        Self {
            entries: VecDeque::new(),
            acks: FuturesUnordered::new(),
            last_stored: 0,
            gap: None,
            total,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn add(&mut self, msg: Outgoing, outcome: Option<Outcome>) {
        if let Some(last) = self.entries.back() {
            debug_assert_eq!(last.msg.seq + 1, msg.seq, "in flight in order");
        }
        self.entries.push_back(Entry {
            msg,
            sent: Instant::now(),
            outcome,
        });
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// A message sent, with its ack (see [`ack_within`]).
    pub fn push(&mut self, msg: Outgoing, ack: BoxFuture<'static, Outcome>) {
        let seq = msg.seq;
        self.acks
            .push(ack.map(move |outcome| (seq, outcome)).boxed());
        self.add(msg, None);
    }

    /// A message whose publish failed before it was sent (it may still go out later: it is
    /// treated as a failed one, sent again with the same id).
    pub fn push_failed(&mut self, msg: Outgoing, error: LiveError) {
        self.add(msg, Some(Err(error)));
    }

    fn record(&mut self, seq: u64, outcome: Outcome) {
        let Some(first) = self.entries.front().map(|e| e.msg.seq) else {
            return;
        };
        if let Some(entry) = seq
            .checked_sub(first)
            .and_then(|i| self.entries.get_mut(i as usize))
        {
            entry.outcome = Some(outcome);
        }
    }

    /// Takes in the outcomes that have arrived, without waiting, and lets go of the messages
    /// stored in order at the front. Err when a message failed or the order broke.
    pub fn check(&mut self) -> Result<(), LiveError> {
        while let Some(Some((seq, outcome))) = self.acks.next().now_or_never() {
            self.record(seq, outcome);
        }
        self.pop_stored();
        if let Some(gap) = &self.gap {
            return Err(LiveError::Nats(gap.clone()));
        }
        match self
            .entries
            .iter()
            .find_map(|e| e.outcome.as_ref().and_then(|o| o.as_ref().err()))
        {
            Some(e) => Err(LiveError::Nats(e.to_string())),
            None => Ok(()),
        }
    }

    fn pop_stored(&mut self) {
        while let Some(Some(Ok(stored))) = self.entries.front().map(|e| e.outcome.as_ref()) {
            let stored = *stored;
            let entry = self.entries.pop_front().expect("non-empty");
            self.total.fetch_sub(1, Ordering::Relaxed);
            crate::latency::PUBLISH_ACK.observe(entry.sent.elapsed());
            if stored <= self.last_stored && self.gap.is_none() {
                self.gap = Some(format!(
                    "message {} stored at stream sequence {stored}, not after {}",
                    entry.msg.seq, self.last_stored
                ));
            }
            self.last_stored = self.last_stored.max(stored);
        }
    }

    /// Waits until the oldest message's outcome is known (its deadline bounds the wait), then
    /// [`InFlight::check`]s.
    pub async fn wait_oldest(&mut self) -> Result<(), LiveError> {
        while self.entries.front().is_some_and(|e| e.outcome.is_none()) {
            let Some((seq, outcome)) = self.acks.next().await else {
                break;
            };
            self.record(seq, outcome);
        }
        self.check()
    }

    /// Waits for every outcome (bounded by the deadlines), empties the window and says what the
    /// subject holds.
    pub async fn settle(&mut self) -> Verdict {
        while let Some((seq, outcome)) = self.acks.next().await {
            self.record(seq, outcome);
        }
        self.pop_stored();
        let verdict = if let Some(gap) = self.gap.take() {
            Verdict::Gap(gap)
        } else if self.entries.is_empty() {
            Verdict::Stored
        } else {
            let error = match self.entries.front().and_then(|e| e.outcome.as_ref()) {
                Some(Err(e)) => LiveError::Nats(e.to_string()),
                _ => LiveError::Nats("not acknowledged".into()),
            };
            let lost = self.entries.iter().map(|e| e.msg.clone()).collect();
            Verdict::Resend(lost, error)
        };
        self.clear();
        verdict
    }

    /// Stream sequence of the last message stored in order.
    pub fn last_stored(&self) -> u64 {
        self.last_stored
    }

    /// Forgets every message in flight (their output is being replaced).
    pub fn clear(&mut self) {
        self.total.fetch_sub(self.entries.len(), Ordering::Relaxed);
        self.entries.clear();
        self.acks = FuturesUnordered::new();
        self.gap = None;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use futures::future;

    use super::*;

    fn msg(seq: u64) -> Outgoing {
        Outgoing {
            seq,
            gen: 0,
            kind: "chunk",
            part: None,
            payload: Bytes::from(format!("c{seq}")),
            created: Instant::now(),
        }
    }

    /// A window holding messages 1.. with these outcomes (`None`: failed).
    fn window(stored_at: &[Option<u64>]) -> InFlight {
        let mut w = InFlight::new(Arc::default());
        for (i, at) in stored_at.iter().enumerate() {
            let outcome = at.ok_or(LiveError::Nats("no responders".into()));
            w.push(msg(i as u64 + 1), future::ready(outcome).boxed());
        }
        w
    }

    fn seqs(v: &Verdict) -> Vec<u64> {
        match v {
            Verdict::Resend(lost, _) => lost.iter().map(|m| m.seq).collect(),
            _ => vec![],
        }
    }

    #[tokio::test]
    async fn messages_stored_in_order_let_go_of_the_window() {
        let mut w = window(&[Some(10), Some(12), Some(13)]);
        assert!(w.check().is_ok());
        assert!(w.is_empty() && w.last_stored() == 13);
        assert!(matches!(w.settle().await, Verdict::Stored));
        assert_eq!(w.total.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_lost_message_is_sent_again_with_every_one_after_it_stored_or_not() {
        // 1 stored; 2 lost; 3 stored (its place is checked by the resend's acks); 4 lost
        let mut w = window(&[Some(10), None, Some(12), None]);
        assert!(w.check().is_err(), "a failure is noticed without waiting");
        let verdict = w.settle().await;
        assert_eq!(seqs(&verdict), [2, 3, 4], "{verdict:?}");
        assert_eq!(w.last_stored(), 10);
        assert!(w.is_empty() && w.total.load(Ordering::Relaxed) == 0);
    }

    #[tokio::test]
    async fn a_message_stored_before_an_earlier_one_is_a_gap() {
        let mut w = window(&[Some(10), Some(11)]);
        w.check().unwrap();
        // a resend of 3 and 4: 3 stored after 4, which had been stored before (its ack lost)
        w.push(msg(3), future::ready(Ok(20)).boxed());
        w.push(msg(4), future::ready(Ok(15)).boxed());
        assert!(w.check().is_err());
        assert!(matches!(w.settle().await, Verdict::Gap(_)));
    }

    #[tokio::test]
    async fn only_acks_lost_is_no_gap() {
        // 2 and 3 were stored at 11 and 12 but their acks were lost: the resend's acks (as
        // duplicates) name the same places, in order
        let mut w = window(&[Some(10), None, None]);
        let Verdict::Resend(lost, _) = w.settle().await else {
            panic!("resend")
        };
        for (m, at) in lost.into_iter().zip([11, 12]) {
            w.push(m, future::ready(Ok(at)).boxed());
        }
        assert!(matches!(w.settle().await, Verdict::Stored));
        assert_eq!(w.last_stored(), 12);
    }
}
