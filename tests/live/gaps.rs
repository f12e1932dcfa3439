//! Messages lost on their way to JetStream (a NATS node died with them, or the stream was
//! electing a leader) and a later message stored anyway: an attacher never shows a message that
//! follows a lost one, and shows the output whole once the publisher republishes it.

use async_nats::HeaderMap;
use bytes::Bytes;
use spool::live::LiveOutput;

use crate::common::nats::NatsServer;
use crate::common::TestDb;
use crate::in_process::{attach_after, live_output};

/// Publishes a message of attempt 1 of `run_id` as the publisher numbers it; returns its stream
/// sequence.
async fn put(live: &LiveOutput, db: &TestDb, run: &str, msg: (&str, u64, u64, &str)) -> u64 {
    let (kind, seq, gen, payload) = msg;
    let enqueue_seq = db
        .scalar_i64(&format!(
            "select enqueue_seq from spool.runs where id = '{run}'"
        ))
        .await;
    let mut h = HeaderMap::new();
    h.insert("Spool-Kind", kind);
    h.insert("Spool-Run", run);
    h.insert("Spool-Epoch", "1");
    h.insert("Spool-Seq", seq.to_string().as_str());
    h.insert("Spool-Gen", gen.to_string().as_str());
    let subject = live.subject(run, enqueue_seq, 1);
    let ack = live
        .js
        .publish_with_headers(subject, h, Bytes::from(payload.to_string()))
        .await
        .unwrap();
    ack.await.unwrap().sequence
}

async fn running(db: &TestDb, run: &str) {
    db.exec(&format!("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('{run}', 'ticker', 'running', 'e', 1, 1)")).await;
}

/// The republished generation 1 of four ticks, numbered from `seq`, and the end.
async fn republished(live: &LiveOutput, db: &TestDb, run: &str, seq: u64) {
    put(live, db, run, ("reset", seq, 1, "")).await;
    for i in 1..=4 {
        let tick = format!("tick-{i}");
        put(live, db, run, ("chunk", seq + i, 1, &tick)).await;
    }
    put(live, db, run, ("done", seq + 5, 1, "{\"ticks\":4}")).await;
}

fn events(kinds: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    let kind = |k: &str| match k {
        "chunk" => "chunk",
        "reset" => "reset",
        _ => "done",
    };
    kinds
        .iter()
        .map(|(k, d)| (kind(k), d.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_follows_a_lost_one_is_never_shown_and_the_republished_output_is() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    running(&db, "g").await;
    // Generation 0 lost its message 3 (tick-3) and stored message 4 (tick-4) after it.
    let t1 = put(&live, &db, "g", ("chunk", 1, 0, "tick-1")).await;
    let t2 = put(&live, &db, "g", ("chunk", 2, 0, "tick-2")).await;
    put(&live, &db, "g", ("chunk", 4, 0, "tick-4")).await;
    republished(&live, &db, "g", 5).await;
    let whole = [
        ("chunk", "tick-1"),
        ("chunk", "tick-2"),
        ("chunk", "tick-3"),
        ("chunk", "tick-4"),
        ("done", "{\"ticks\":4}"),
    ];

    // from the start: the two ticks that follow each other, then (tick-4 hidden) the reset and
    // the whole output
    let fresh = attach_after(&live, &db, "g", 0).await;
    let mut expected = events(&[("chunk", "tick-1"), ("chunk", "tick-2"), ("reset", "")]);
    expected.extend(events(&whole));
    assert_eq!(fresh, expected);
    // resuming after tick-1: tick-2 follows it; after tick-2: tick-4 does not
    let after_t1 = attach_after(&live, &db, "g", t1).await;
    assert_eq!(after_t1, expected[1..]);
    let after_t2 = attach_after(&live, &db, "g", t2).await;
    assert_eq!(after_t2, expected[2..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_whose_first_message_was_lost_is_never_shown() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    running(&db, "h").await;
    // message 1 (tick-1) lost; 2 and 3 stored
    put(&live, &db, "h", ("chunk", 2, 0, "tick-2")).await;
    put(&live, &db, "h", ("chunk", 3, 0, "tick-3")).await;
    republished(&live, &db, "h", 4).await;
    // nothing shown before the republish, so its reset is not sent either
    let fresh = attach_after(&live, &db, "h", 0).await;
    assert_eq!(
        fresh,
        events(&[
            ("chunk", "tick-1"),
            ("chunk", "tick-2"),
            ("chunk", "tick-3"),
            ("chunk", "tick-4"),
            ("done", "{\"ticks\":4}"),
        ])
    );
}
