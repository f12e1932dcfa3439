//! Live output tests: real `spool serve` processes, a real private nats-server per test, real
//! PostgreSQL. They check the attach protocol's promise: every chunk exactly once, in order,
//! then the end event — across crashes and outages.

#[path = "../common/mod.rs"]
mod common;

mod chat;
mod cluster;
mod fanout;
mod gaps;
mod in_process;
mod late_end;
mod metrics;
mod wire;

use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::Signal;
use spool::sse_client::{self, SseEvent};

use common::nats::NatsServer;
use common::process::{Binary, SpoolProcess};
use common::{wait_steps, wait_terminal, wait_until, TestDb};

/// Environment of a spool process publishing to `nats`, on a stream of this test's own.
fn live_env(db: &TestDb, nats: &NatsServer) -> Vec<(String, String)> {
    vec![
        ("NATS_URL".into(), nats.url()),
        ("SPOOL_NATS_STREAM".into(), format!("S_{}", db.name)),
        (
            "SPOOL_NATS_SUBJECT_PREFIX".into(),
            format!("out_{}", db.name),
        ),
    ]
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Reads events until the end event (or `limit` events), failing after 60 s.
async fn collect(base: &str, run_id: &str, after: Option<&str>, limit: usize) -> Vec<SseEvent> {
    collect_within(Duration::from_secs(60), base, run_id, after, limit).await
}

/// Reads events until the end event (or `limit` events), failing after `deadline`.
async fn collect_within(
    deadline: Duration,
    base: &str,
    run_id: &str,
    after: Option<&str>,
    limit: usize,
) -> Vec<SseEvent> {
    let events = sse_client::attach(base, None, run_id, after)
        .await
        .expect("attach");
    let mut events = Box::pin(events);
    let mut out = Vec::new();
    let read = async {
        while let Some(e) = events.next().await {
            let e = e.expect("event");
            let end = e.is_end();
            out.push(e);
            if end || out.len() >= limit {
                break;
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .expect("attach ended in time");
    out
}

fn chunks(events: &[SseEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "chunk")
        .map(|e| e.data.clone())
        .collect()
}

fn ticks(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("tick-{i}")).collect()
}

/// Enqueues a ticker run by SQL.
async fn ticker(db: &TestDb, id: &str, count: usize, interval_ms: u64, steps: usize) {
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input) values ('{id}', 'ticker', '{{\"count\": {count}, \"interval_ms\": {interval_ms}, \"steps\": {steps}}}')"
    ))
    .await;
}

/// Starts an executor, lets `run_id` record `steps` steps, SIGKILLs it, restarts it with the
/// same id, and returns the new process.
async fn kill_mid_run_and_restart(
    db: &TestDb,
    env: &[(String, String)],
    run_id: &str,
    steps: i64,
) -> SpoolProcess {
    let mut first = SpoolProcess::start(Binary::Spool, db, "owner", &env_refs(env)).await;
    wait_steps(db, run_id, steps).await;
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10)).await;
    SpoolProcess::start(Binary::Spool, db, "owner", &env_refs(env)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_attacher_after_sigkill_and_restart_sees_every_tick_exactly_once() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    ticker(&db, "t", 30, 40, 5).await;
    let second = kill_mid_run_and_restart(&db, &env, "t", 2).await;
    // attach as soon as the restarted executor has re-claimed the run, while it replays
    wait_until(
        "the run to be re-claimed",
        Duration::from_secs(30),
        || async {
            (db.scalar_i64("select claim_epoch from spool.runs where id = 't'")
                .await
                == 2)
                .then_some(())
        },
    )
    .await;
    let events = collect(&second.url(""), "t", None, 1000).await;
    assert_eq!(
        chunks(&events),
        ticks(30),
        "every chunk exactly once, in order: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.event.as_str(), last.data.as_str()),
        ("done", "{\"ticks\":30}")
    );
    assert_eq!(
        wait_terminal(&db, "t", Duration::from_secs(30)).await,
        "succeeded"
    );
    // The subject itself holds only the last attempt: the killed attempt's chunks were purged
    // (not merely hidden by the attacher).
    let epochs = subject_epochs(&db, &nats, "t").await;
    assert!(!epochs.is_empty());
    assert!(
        epochs.iter().all(|e| *e == 2),
        "leftovers of the killed attempt on the subject: {epochs:?}"
    );
}

/// The claim epoch of every message on a run's subject, in stream order.
async fn subject_epochs(db: &TestDb, nats: &NatsServer, run_id: &str) -> Vec<i64> {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(format!("S_{}", db.name))
        .await
        .unwrap();
    let state = stream.info().await.unwrap().state.clone();
    // every attempt's subject: `{prefix}.{run_id}.{enqueue_seq}.{claim_epoch}`
    let subjects = format!("out_{}.{run_id}.", db.name);
    let mut epochs = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            if m.subject.as_str().starts_with(&subjects) {
                epochs.push(
                    m.headers
                        .get("Spool-Epoch")
                        .unwrap()
                        .as_str()
                        .parse()
                        .unwrap(),
                );
            }
        }
    }
    epochs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_during_step_three_still_shows_steps_one_and_two_to_a_late_attacher() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    ticker(&db, "t3", 12, 60, 3).await;
    let second = kill_mid_run_and_restart(&db, &env, "t3", 2).await;
    assert_eq!(
        wait_terminal(&db, "t3", Duration::from_secs(30)).await,
        "succeeded"
    );
    let events = collect(&second.url(""), "t3", None, 1000).await;
    assert_eq!(chunks(&events), ticks(12), "{events:?}");
    assert_eq!(events.last().unwrap().event, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attacher_across_the_crash_sees_reset_then_the_whole_output_once() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    // the attacher talks to an API-only process that survives the executor's death
    let mut api_env = env_refs(&env);
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;
    ticker(&db, "x", 24, 50, 4).await;
    let base = api.url("");
    let attacher = tokio::spawn(async move { collect(&base, "x", None, 1000).await });
    let _second = kill_mid_run_and_restart(&db, &env, "x", 2).await;
    let events = attacher.await.unwrap();
    let resets: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event == "reset")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(resets.len(), 1, "exactly one reset: {events:?}");
    let before = chunks(&events[..resets[0]]);
    assert!(
        !before.is_empty(),
        "the attacher saw the first attempt's output"
    );
    assert_eq!(
        before,
        ticks(before.len()),
        "the first attempt's output is a clean prefix"
    );
    assert_eq!(
        chunks(&events[resets[0]..]),
        ticks(24),
        "after the reset, the whole output once"
    );
    assert_eq!(events.last().unwrap().event, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_before_the_first_chunk_mid_run_after_done_and_resume_with_last_event_id() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let mut env = live_env(&db, &nats);
    env.push(("SPOOL_QUEUES".into(), "default".into()));
    let p = SpoolProcess::start(Binary::Spool, &db, "e", &env_refs(&env)).await;
    // held in a queue nobody serves until every early attacher is connected
    db.exec("insert into spool.runs (id, workflow, queue, input) values ('a', 'ticker', 'held', '{\"count\": 20, \"interval_ms\": 30, \"steps\": 4}')").await;
    let base = p.url("");
    let early = {
        let base = base.clone();
        tokio::spawn(async move { collect(&base, "a", None, 1000).await })
    };
    // a resumer reads three events, disconnects, and resumes after the third
    let first_three = {
        let base = base.clone();
        tokio::spawn(async move { collect(&base, "a", None, 3).await })
    };
    wait_until(
        "both attachers to connect",
        Duration::from_secs(10),
        || async {
            let text = reqwest::get(format!("{base}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("spool_attachers 2").then_some(())
        },
    )
    .await;
    db.exec("update spool.runs set queue = 'default' where id = 'a'")
        .await;
    wait_steps(&db, "a", 1).await;
    let mid = collect(&base, "a", None, 1000).await;
    assert_eq!(
        wait_terminal(&db, "a", Duration::from_secs(30)).await,
        "succeeded"
    );
    let after = collect(&base, "a", None, 1000).await;
    let early = early.await.unwrap();
    let head = first_three.await.unwrap();
    assert_eq!(head.len(), 3);
    let tail = collect(&base, "a", head[2].id.as_deref(), 1000).await;
    let mut resumed = head.clone();
    resumed.extend(tail);
    for (name, events) in [
        ("early", &early),
        ("mid-run", &mid),
        ("after done", &after),
        ("resumed", &resumed),
    ] {
        assert_eq!(chunks(events), ticks(20), "{name} attacher: {events:?}");
        assert_eq!(events.last().unwrap().event, "done", "{name} attacher");
        assert!(
            events.iter().all(|e| e.id.is_some()),
            "{name}: every event has an id"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_after_the_end_it_was_sent_gets_the_end_again_at_once() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    let p = SpoolProcess::start(Binary::Spool, &db, "e", &env_refs(&env)).await;
    ticker(&db, "fin", 5, 1, 1).await;
    let events = collect(&p.url(""), "fin", None, 1000).await;
    let end = events.last().unwrap().clone();
    assert_eq!(end.event, "done", "{events:?}");
    // (a browser reloading the page after the end, an EventSource reconnecting by itself)
    // The end is not awaited from the publisher (whose executor is alive): the client's
    // position shows it was sent already. Well within the 30 s an absent end is awaited.
    let again = collect_within(
        Duration::from_secs(15),
        &p.url(""),
        "fin",
        end.id.as_deref(),
        1000,
    )
    .await;
    assert_eq!(again, vec![end.clone()], "the end again, nothing else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_whose_chunks_expired_attaches_with_its_end_from_postgres() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let mut env = live_env(&db, &nats);
    env.push(("SPOOL_CHUNK_MAX_AGE_SECS".into(), "1".into()));
    let p = SpoolProcess::start(Binary::Spool, &db, "e", &env_refs(&env)).await;
    ticker(&db, "old", 3, 1, 1).await;
    assert_eq!(
        wait_terminal(&db, "old", Duration::from_secs(30)).await,
        "succeeded"
    );
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(format!("S_{}", db.name))
        .await
        .unwrap();
    let subject = format!("out_{}.old.>", db.name);
    wait_until("the chunks to expire", Duration::from_secs(30), || async {
        stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let events = collect(&p.url(""), "old", None, 1000).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].event.as_str(), events[0].data.as_str()),
        ("done", "{\"ticks\":3}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_mid_run_the_run_completes_and_attachers_get_unavailable_then_the_output() {
    let db = TestDb::new().await;
    let mut nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    let p = SpoolProcess::start(Binary::Spool, &db, "e", &env_refs(&env)).await;
    ticker(&db, "n", 30, 50, 5).await;
    let base = p.url("");
    let attacher = {
        let base = base.clone();
        tokio::spawn(async move { collect(&base, "n", None, 1000).await })
    };
    wait_steps(&db, "n", 1).await;
    nats.kill();
    assert_eq!(
        wait_terminal(&db, "n", Duration::from_secs(60)).await,
        "succeeded",
        "the run completes without NATS"
    );
    nats.restart().await;
    let events = attacher.await.unwrap();
    assert!(
        events.iter().any(|e| e.event == "unavailable"),
        "an explicit event, not silence: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.event.as_str(), last.data.as_str()),
        ("done", "{\"ticks\":30}")
    );
    // once NATS is back, the publisher republishes the whole output: a late attacher sees it once
    let client = async_nats::connect(nats.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(format!("S_{}", db.name))
        .await
        .unwrap();
    let subject = format!("out_{}.n.>", db.name);
    wait_until(
        "the output to be republished with its end",
        Duration::from_secs(60),
        || async {
            let last = stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .ok()?;
            (last.headers.get("Spool-Kind")?.as_str() == "done").then_some(())
        },
    )
    .await;
    let late = collect(&base, "n", None, 1000).await;
    assert_eq!(chunks(&late), ticks(30), "{late:?}");
    assert_eq!(late.last().unwrap().event, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_attach_streams_with_a_resumable_id_and_another_process_resumes_without_gap_or_duplicate(
) {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    // `worker` executes the run; `doomed` is a whole `spool serve` (executor and API) serving
    // another queue, so its SIGTERM ends nothing but its attach streams.
    let worker = SpoolProcess::start(Binary::Spool, &db, "worker", &env_refs(&env)).await;
    let mut doomed_env = env_refs(&env);
    doomed_env.push(("SPOOL_QUEUES", "elsewhere"));
    doomed_env.push(("SPOOL_GRACE_PERIOD_MS", "2000"));
    let mut doomed = SpoolProcess::start(Binary::Spool, &db, "doomed", &doomed_env).await;
    const N: usize = 200;
    ticker(&db, "long", N, 50, 10).await; // about 10 s of output

    let events = sse_client::attach(&doomed.url(""), None, "long", None)
        .await
        .expect("attach");
    let mut events = Box::pin(events);
    let mut head: Vec<SseEvent> = Vec::new();
    while chunks(&head).len() < 5 {
        let e = tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("chunks arrive")
            .expect("the stream is open")
            .expect("an event");
        head.push(e);
    }
    doomed.signal(Signal::SIGTERM);
    // Both within the deadline: the client's stream ends, and the process exits (the run has
    // about 9 s to go, so neither may wait for it).
    let deadline = Duration::from_secs(5);
    let (ended, status) = tokio::join!(
        tokio::time::timeout(deadline, async {
            while let Some(e) = events.next().await {
                match e {
                    Ok(e) => head.push(e),
                    Err(_) => break, // a cut connection is an end too; the id below says where
                }
            }
        }),
        doomed.wait_exit(deadline)
    );
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        doomed.log_text()
    );
    assert!(
        ended.is_ok(),
        "the attach stream ended when the server stopped: {head:?}"
    );
    assert!(!head.iter().any(SseEvent::is_end), "{head:?}");
    let last = head.last().unwrap();
    assert_eq!(
        last.event, "reconnect",
        "the documented last word: {head:?}"
    );
    let before: Vec<&SseEvent> = head.iter().filter(|e| e.event == "chunk").collect();
    assert_eq!(
        last.id,
        before.last().unwrap().id,
        "`reconnect` carries the id of the last chunk the client was sent"
    );
    assert_eq!(chunks(&head), ticks(chunks(&head).len()));

    // Another process resumes right after that id: no chunk twice, none missing.
    let tail = collect(&worker.url(""), "long", last.id.as_deref(), 1000).await;
    assert!(!tail.iter().any(|e| e.event == "reset"), "{tail:?}");
    let mut all = chunks(&head);
    all.extend(chunks(&tail));
    assert_eq!(all, ticks(N));
    assert_eq!(tail.last().unwrap().event, "done");
}
