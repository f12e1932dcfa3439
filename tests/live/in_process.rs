//! Live-output tests that drive the publisher and the attach endpoint in process.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use spool::api::{self, AppState, AttachLimits};
use spool::executor::Metrics;
use spool::live::attach::{self, AttachEvent};
use spool::live::publisher::ChunkPublisher;
use spool::live::{LiveOutput, LiveSettings};
use spool::sse_client;
use spool::workflow::{ChunkSink, RunEnd, RunIdentity};
use spool::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::common::nats::NatsServer;
use crate::common::{wait_until, TestDb};

pub(crate) async fn live_output(db: &TestDb, nats: &NatsServer) -> Arc<LiveOutput> {
    let mut settings = LiveSettings::new(nats.url());
    settings.stream = format!("S_{}", db.name);
    settings.subject_prefix = format!("out_{}", db.name);
    let live = LiveOutput::connect(settings, CancellationToken::new())
        .await
        .unwrap();
    wait_until("the stream to exist", Duration::from_secs(20), || async {
        live.ensure_stream().await.ok().map(|_| ())
    })
    .await;
    live
}

/// Attempt `epoch` of the run `run_id` (already inserted).
async fn attempt(db: &TestDb, run_id: &str, epoch: i64) -> RunIdentity {
    let row = db
        .client()
        .await
        .query_one(
            "select enqueue_seq from spool.runs where id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    RunIdentity {
        run_id: run_id.into(),
        enqueue_seq: row.get(0),
        claim_epoch: epoch,
        attempt: epoch as i32,
    }
}

/// Reads a run's events through the attach producer until its end event.
async fn attach_events(live: &Arc<LiveOutput>, db: &TestDb, run_id: &str) -> Vec<AttachEvent> {
    let client = db.client().await;
    let run = spool::db::runs::get_run(&client, run_id)
        .await
        .unwrap()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(attach::produce(live.clone(), db.pool.clone(), run, 0, tx));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = rx.recv().await {
            let end = e.is_end();
            out.push(e);
            if end {
                break;
            }
        }
    })
    .await
    .expect("attach ends");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_publishers_chunks_never_appear_after_the_new_attempts_reset() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    db.exec("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('z', 'ticker', 'running', 'e', 2, 2)").await;
    let zombie = ChunkPublisher::new(live.clone(), &attempt(&db, "z", 1).await);
    let current = ChunkPublisher::new(live.clone(), &attempt(&db, "z", 2).await);

    zombie.emit("zombie-1".into()).await;
    zombie.flush().await;
    current.emit("tick-1".into()).await; // purge, reset, tick-1
    zombie.emit("zombie-2".into()).await; // the zombie wakes up after the reset
    zombie.flush().await;
    current.emit("tick-2".into()).await;
    current.flush().await;
    db.exec("update spool.runs set status = 'succeeded', output = '{\"ticks\": 2}', finished_at = now() where id = 'z'").await;
    current.finish(RunEnd::Done(json!({"ticks": 2}))).await;

    // the zombie's late chunk really is on the subject, after the reset ...
    let mut stream = live.ensure_stream().await.unwrap().clone();
    let state = stream.info().await.unwrap().state.clone();
    let mut on_subject = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            on_subject.push(String::from_utf8_lossy(&m.payload).into_owned());
        }
    }
    assert!(
        on_subject.contains(&"zombie-2".to_string()),
        "{on_subject:?}"
    );
    // ... and no attacher is shown it
    let events = attach_events(&live, &db, "z").await;
    let kinds: Vec<(&str, &str)> = events.iter().map(|e| (e.kind, e.data.as_str())).collect();
    assert_eq!(
        kinds,
        // (a fresh attacher is not sent the reset: it has nothing to clear)
        [
            ("chunk", "tick-1"),
            ("chunk", "tick-2"),
            ("done", "{\"ticks\":2}")
        ]
    );
}

/// Reads a run's events through the attach producer, resuming after stream sequence `after`.
pub(crate) async fn attach_after(
    live: &Arc<LiveOutput>,
    db: &TestDb,
    run_id: &str,
    after: u64,
) -> Vec<(&'static str, String)> {
    let client = db.client().await;
    let run = spool::db::runs::get_run(&client, run_id)
        .await
        .unwrap()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(attach::produce(
        live.clone(),
        db.pool.clone(),
        run,
        after,
        tx,
    ));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = rx.recv().await {
            let end = e.is_end();
            out.push((e.kind, e.data));
            if end {
                break;
            }
        }
    })
    .await
    .expect("attach ends");
    out
}

/// Stream sequence of every message of a run, with its kind, epoch and payload.
async fn messages_of(live: &Arc<LiveOutput>, run_id: &str) -> Vec<(u64, String, i64, String)> {
    let mut stream = live.ensure_stream().await.unwrap().clone();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        if m.headers.get("Spool-Run").map(|r| r.as_str()) != Some(run_id) {
            continue;
        }
        let kind = m.headers.get("Spool-Kind").unwrap().as_str().to_string();
        let epoch = m
            .headers
            .get("Spool-Epoch")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        out.push((
            seq,
            kind,
            epoch,
            String::from_utf8_lossy(&m.payload).into_owned(),
        ));
    }
    out
}

/// What a superseded attempt does first, after the current attempt has already published.
#[derive(Debug, Clone, Copy)]
enum ZombieMove {
    /// Its first chunk (which purged the whole subject before publishing).
    FirstEmit,
    /// A retry's rewind of its output.
    Rewind,
    /// The settle before its end, never having emitted (an attempt after a crash clears what
    /// an earlier one published).
    Settle,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_that_first_publishes_after_the_current_attempt_deletes_and_hides_nothing() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    for (n, zombie_move) in [
        ZombieMove::FirstEmit,
        ZombieMove::Rewind,
        ZombieMove::Settle,
    ]
    .into_iter()
    .enumerate()
    {
        let run_id = format!("zm{n}");
        db.exec(&format!("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('{run_id}', 'ticker', 'running', 'e', 3, 3)")).await;
        let zombie_attempt = attempt(&db, &run_id, 2).await;
        let zombie_seq = zombie_attempt.enqueue_seq;
        let zombie = ChunkPublisher::new(live.clone(), &zombie_attempt);
        let current = ChunkPublisher::new(live.clone(), &attempt(&db, &run_id, 3).await);

        current.emit("tick-1".into()).await; // purge, reset, tick-1
        current.flush().await;
        match zombie_move {
            ZombieMove::FirstEmit => zombie.emit("zombie-1".into()).await,
            ZombieMove::Rewind => zombie.rewind(0).await,
            ZombieMove::Settle => {}
        }
        zombie.flush().await;
        current.emit("tick-2".into()).await;
        current.flush().await;
        db.exec(&format!("update spool.runs set status = 'succeeded', output = '{{\"ticks\": 2}}', finished_at = now() where id = '{run_id}'")).await;
        current.finish(RunEnd::Done(json!({"ticks": 2}))).await;

        // The current attempt's reset and first chunk are still in the stream.
        let messages = messages_of(&live, &run_id).await;
        let current_messages: Vec<(&str, &str)> = messages
            .iter()
            .filter(|m| m.2 == 3)
            .map(|m| (m.1.as_str(), m.3.as_str()))
            .collect();
        assert_eq!(
            current_messages,
            [
                ("reset", ""),
                ("chunk", "tick-1"),
                ("chunk", "tick-2"),
                ("done", "{\"ticks\":2}")
            ],
            "{zombie_move:?}: the current attempt's messages in the stream: {messages:?}"
        );
        // (the attacher finds a run's last message across its attempts' subjects)
        let last = live
            .ensure_stream()
            .await
            .unwrap()
            .get_last_raw_message_by_subject(&live.run_subjects(&run_id, zombie_seq))
            .await
            .unwrap();
        assert_eq!(last.sequence, messages.last().unwrap().0);
        let seq_of = |kind: &str, data: &str| {
            messages
                .iter()
                .find(|m| m.2 == 3 && m.1 == kind && m.3 == data)
                .unwrap()
                .0
        };

        // A late attacher, and resumes from the reset and from the first chunk, each see the
        // current attempt exactly once.
        let whole = [
            ("chunk", "tick-1".to_string()),
            ("chunk", "tick-2".to_string()),
            ("done", "{\"ticks\":2}".to_string()),
        ];
        assert_eq!(
            attach_after(&live, &db, &run_id, 0).await,
            whole,
            "{zombie_move:?}: late attacher"
        );
        assert_eq!(
            attach_after(&live, &db, &run_id, seq_of("reset", "")).await,
            whole,
            "{zombie_move:?}: resume after the reset"
        );
        assert_eq!(
            attach_after(&live, &db, &run_id, seq_of("chunk", "tick-1")).await,
            whole[1..],
            "{zombie_move:?}: resume after the first chunk"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_id_inserted_again_shows_none_of_the_deleted_rows_output() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    db.exec("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('again', 'ticker', 'running', 'e', 2, 2)").await;
    for epoch in [1, 2] {
        let old = ChunkPublisher::new(live.clone(), &attempt(&db, "again", epoch).await);
        old.emit(format!("old-{epoch}")).await;
        old.finish(RunEnd::Done(json!("old"))).await;
    }
    // The row is deleted and a new run is inserted with the same id.
    db.exec("delete from spool.runs where id = 'again'").await;
    db.exec("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('again', 'ticker', 'running', 'e', 1, 1)").await;
    let new = ChunkPublisher::new(live.clone(), &attempt(&db, "again", 1).await);
    new.emit("new-1".into()).await;
    db.exec("update spool.runs set status = 'succeeded', output = '\"new\"', finished_at = now() where id = 'again'").await;
    new.finish(RunEnd::Done(json!("new"))).await;

    assert_eq!(
        attach_after(&live, &db, "again", 0).await,
        [
            ("chunk", "new-1".to_string()),
            ("done", "\"new\"".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_and_outputs_larger_than_nats_carries_reach_attachers_whole() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    db.exec("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt) values ('big', 'ticker', 'running', 'e', 1, 1)").await;
    let publisher = ChunkPublisher::new(live.clone(), &attempt(&db, "big", 1).await);
    let big_chunk = "c".repeat(3 << 20); // three times NATS's default maximum payload
    let big_output = json!({"text": "o".repeat(5 << 19)});
    publisher.emit("small-1".into()).await;
    publisher.emit(big_chunk.clone()).await;
    publisher.emit("marker".into()).await;
    publisher.flush().await;
    let marker = messages_of(&live, "big")
        .await
        .into_iter()
        .find(|m| m.3 == "marker")
        .unwrap()
        .0;

    // A attaches right after the marker, so the run's feed starts there; B then attaches from
    // the start and reads what lies below the feed from the stream.
    let run = |db: &TestDb| {
        let db = db.pool.clone();
        async move {
            spool::db::runs::get_run(&db.get().await.unwrap(), "big")
                .await
                .unwrap()
                .unwrap()
        }
    };
    let mut a = Box::pin(attach::events(
        live.clone(),
        db.pool.clone(),
        run(&db).await,
        marker,
    ));
    let mut b = Box::pin(attach::events(
        live.clone(),
        db.pool.clone(),
        run(&db).await,
        0,
    ));
    let mut b_events = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(Duration::from_secs(30), b.next())
            .await
            .unwrap()
            .unwrap();
        b_events.push((e.kind, e.data));
    }
    assert_eq!(
        b_events,
        [
            ("chunk", "small-1".to_string()),
            ("chunk", big_chunk.clone()),
            ("chunk", "marker".to_string())
        ]
    );
    db.exec("update spool.runs set status = 'succeeded', finished_at = now() where id = 'big'")
        .await;
    publisher.finish(RunEnd::Done(big_output.clone())).await;
    for events in [&mut a, &mut b] {
        let end = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end.kind, "done");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&end.data).unwrap(),
            big_output
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_and_resumes_with_its_last_event_id() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let live = live_output(&db, &nats).await;
    const N: usize = 3000;
    db.exec("insert into spool.runs (id, workflow, status, executor_id, claim_epoch, attempt, output, finished_at) values ('s', 'ticker', 'succeeded', 'e', 1, 1, '\"big\"', now())").await;
    let publisher = ChunkPublisher::new(live.clone(), &attempt(&db, "s", 1).await);
    let pad = "x".repeat(8 * 1024);
    for i in 0..N {
        publisher.emit(format!("c{i}:{pad}")).await;
    }
    publisher.finish(RunEnd::Done(json!("big"))).await;

    let metrics = Arc::new(Metrics::default());
    let limits = Arc::new(AttachLimits::new(100, 10, Duration::from_secs(15)));
    let state = AppState {
        pool: db.pool.clone(),
        registry: Registry::with_builtins(),
        api_token: None,
        metrics: metrics.clone(),
        max_body_bytes: 1 << 20,
        live: Some(live.clone()),
        attach: limits.clone(),
        readiness: Default::default(),
        edge: Arc::new(api::EdgePolicy::loopback()),
    };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let conn_limits = api::server::ConnLimits {
        max_connections: 1024,
        header_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_millis(300),
    };
    tokio::spawn(api::server::serve(
        tcp,
        api::router(state),
        conn_limits,
        metrics.clone(),
        std::future::pending(),
    ));

    // A client with a tiny receive buffer reads a little, then stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(b"GET /v1/runs/s/stream HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut received = vec![0u8; 64 * 1024];
    conn.read_exact(&mut received).await.unwrap();
    wait_until(
        "the server to cut the slow client",
        Duration::from_secs(60),
        || async { (metrics.connections_cut.load(Ordering::Relaxed) >= 1).then_some(()) },
    )
    .await;
    wait_until(
        "the attacher to be released",
        Duration::from_secs(10),
        || async { (limits.current() == 0).then_some(()) },
    )
    .await;
    // What was in flight to the client still arrives; then the connection ends.
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest).await;
    received.extend_from_slice(&rest);
    let body_at = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body: Vec<Result<Vec<u8>, sse_client::AttachError>> =
        vec![Ok(received[body_at..].to_vec())];
    let head: Vec<_> = sse_client::parse(futures::stream::iter(body))
        .filter_map(|e| async { e.ok() })
        .collect()
        .await;
    assert!(!head.is_empty());
    assert!(
        !head.iter().any(|e| e.is_end()),
        "the slow client was cut before the end"
    );
    let last_id = head.last().unwrap().id.clone().expect("resumable id");

    // It resumes where it was cut.
    let tail = sse_client::attach(&format!("http://{addr}"), None, "s", Some(&last_id))
        .await
        .unwrap();
    let tail: Vec<_> = Box::pin(tail).map(|e| e.unwrap()).collect().await;
    let all: Vec<String> = head
        .iter()
        .chain(tail.iter())
        .filter(|e| e.event == "chunk")
        .map(|e| e.data.split(':').next().unwrap().to_string())
        .collect();
    assert_eq!(
        all,
        (0..N).map(|i| format!("c{i}")).collect::<Vec<_>>(),
        "every chunk exactly once"
    );
    assert_eq!(tail.last().unwrap().event, "done");
}
