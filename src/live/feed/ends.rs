//! How a feed learns of its run's end when no end message comes: one shared watcher asks
//! Postgres which attached runs have ended, and a feed builds the end from the run's row once
//! the end message is evidently not coming.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use deadpool_postgres::Pool;
use tokio::time::Instant;

use super::{Feed, Msg, TICK};
use crate::db::runs::{self, Run};
use crate::live::LiveOutput;

/// How long a run may be finished in Postgres without its end message arriving before the end
/// is built from Postgres, when the executor that ended it is gone.
const END_GRACE: Duration = Duration::from_secs(2);
/// The same while that executor is alive and so still trying to publish the end: long enough
/// for a NATS cluster to elect a new leader for the stream (up to about 10 s after a node dies)
/// and for the publisher to send its lost messages again.
const END_GRACE_PUBLISHER_ALIVE: Duration = Duration::from_secs(30);

impl Feed {
    pub(super) fn set_end_from(&self, run: &Run) {
        {
            let mut st = self.state.lock().unwrap();
            if st.has_end {
                return;
            }
            st.has_end = true;
            st.end = Some(Arc::new(Msg::end_from(run, st.read_to)));
        }
        self.notify();
    }

    /// The run has ended in Postgres: builds its end from the row once the end message is
    /// evidently not coming — NATS is down, or nothing arrived for [`END_GRACE`] (for
    /// [`END_GRACE_PUBLISHER_ALIVE`] while the executor that ended the run is alive) and nothing
    /// on the stream is newer than what the reader read.
    async fn finished(&self, live: &LiveOutput, run: &Run, publisher_alive: bool) {
        let (quiet_since, read_to) = {
            let mut st = self.state.lock().unwrap();
            let seen = *st.finished_seen.get_or_insert_with(Instant::now);
            (seen.max(st.last_message_at), st.read_to)
        };
        if !live.is_connected() {
            self.set_end_from(run);
            return;
        }
        let grace = match publisher_alive {
            true => END_GRACE_PUBLISHER_ALIVE,
            false => END_GRACE,
        };
        if quiet_since.elapsed() <= grace {
            return;
        }
        if last_sequence(live, &self.subjects)
            .await
            .is_some_and(|last| last <= read_to)
        {
            self.set_end_from(run);
        }
    }
}

/// The stream sequence of the newest message on `subjects` (0 when there is none); `None` when
/// NATS does not answer.
async fn last_sequence(live: &LiveOutput, subjects: &str) -> Option<u64> {
    let stream = live.ensure_stream().await.ok()?;
    match tokio::time::timeout(
        live.settings.op_timeout,
        stream.get_last_raw_message_by_subject(subjects),
    )
    .await
    {
        Ok(Ok(m)) => Some(m.sequence),
        Ok(Err(e)) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Some(0),
        _ => None,
    }
}

/// The stream sequence of the newest message on `subjects` and whether it is an end (`None`
/// inside when there is none); `None` when NATS does not answer.
pub(super) async fn last_message(live: &LiveOutput, subjects: &str) -> Option<Option<(u64, bool)>> {
    let stream = live.ensure_stream().await.ok()?;
    match tokio::time::timeout(
        live.settings.op_timeout,
        stream.get_last_raw_message_by_subject(subjects),
    )
    .await
    {
        Ok(Ok(m)) => {
            let end = Msg::decode(m.sequence, Some(&m.headers), &m.payload)
                .is_some_and(|msg| msg.is_end());
            Some(Some((m.sequence, end)))
        }
        Ok(Err(e)) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Some(None),
        _ => None,
    }
}

/// The shared end watcher: every [`TICK`], one statement asks which attached runs without an
/// end have ended.
pub(super) async fn watch_ends(live: Weak<LiveOutput>, pool: Pool) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(live) = live.upgrade() else { return };
        let waiting = live.feeds.waiting_for_end();
        if waiting.is_empty() {
            continue;
        }
        let ids: Vec<String> = waiting.iter().map(|f| f.run_id.clone()).collect();
        let ended = async {
            let client = pool.get().await.ok()?;
            runs::ended_runs(&client, &ids).await.ok()
        }
        .await;
        let Some(ended) = ended else { continue };
        for ended in ended {
            let run = &ended.run;
            for feed in waiting
                .iter()
                .filter(|f| f.run_id == run.id && f.enqueue_seq == run.enqueue_seq)
            {
                feed.finished(&live, run, ended.publisher_alive).await;
            }
        }
    }
}
