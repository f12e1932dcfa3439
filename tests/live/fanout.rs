//! Attach fan-out: many local attachers of one run share one reader (one JetStream consumer)
//! and each still gets the attach protocol's promise at its own position.

use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::Signal;
use spool::sse_client::{self, SseEvent};
use tokio::sync::mpsc;

use crate::common::nats::NatsServer;
use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_steps, wait_terminal, wait_until, TestDb};
use crate::{env_refs, live_env, ticker, ticks};

/// An attacher whose events arrive on a channel as they come, so a test can wait on them.
struct Watcher {
    events: mpsc::UnboundedReceiver<SseEvent>,
    seen: Vec<SseEvent>,
}

impl Watcher {
    fn attach(base: &str, run_id: &str, after: Option<String>) -> Watcher {
        let (tx, events) = mpsc::unbounded_channel();
        let (base, run_id) = (base.to_string(), run_id.to_string());
        tokio::spawn(async move {
            let stream = sse_client::attach(&base, None, &run_id, after.as_deref())
                .await
                .expect("attach");
            let mut stream = Box::pin(stream);
            while let Some(e) = stream.next().await {
                let e = e.expect("event");
                let end = e.is_end();
                if tx.send(e).is_err() || end {
                    return;
                }
            }
        });
        Watcher {
            events,
            seen: Vec::new(),
        }
    }

    /// Waits until this attacher has received at least `n` events.
    async fn wait_events(&mut self, n: usize) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.seen.len() < n {
                let e = self.events.recv().await.expect("attacher still reading");
                self.seen.push(e);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} events in time; got {:?}", self.seen));
    }

    /// Every event until the end.
    async fn until_end(mut self) -> Vec<SseEvent> {
        tokio::time::timeout(Duration::from_secs(60), async {
            while !self.seen.last().is_some_and(SseEvent::is_end) {
                let e = self.events.recv().await.expect("attacher still reading");
                self.seen.push(e);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the end in time; got {:?}", self.seen));
        self.seen
    }
}

/// What a client renders: `reset` clears, chunks append. Panics on a chunk that repeats one the
/// rendering already holds (a duplicate the client would show).
fn render(mut shown: Vec<String>, events: &[SseEvent]) -> Vec<String> {
    for e in events {
        match e.event.as_str() {
            "reset" => shown.clear(),
            "chunk" => {
                assert!(
                    !shown.contains(&e.data),
                    "{} shown twice: {events:?}",
                    e.data
                );
                shown.push(e.data.clone());
            }
            _ => {}
        }
    }
    shown
}

async fn consumers(nats: &NatsServer, db: &TestDb) -> usize {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(format!("S_{}", db.name))
        .await
        .unwrap();
    stream.info().await.unwrap().state.consumer_count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachers_at_different_positions_share_one_consumer_and_each_renders_the_output_once_across_a_crash(
) {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let env = live_env(&db, &nats);
    // the attachers talk to an API-only process that survives the executor's death
    let mut api_env = env_refs(&env);
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;
    let base = api.url("");
    ticker(&db, "f", 40, 40, 4).await;
    let mut executor = SpoolProcess::start(Binary::Spool, &db, "owner", &env_refs(&env)).await;

    // A from the start; a short-lived attacher hands C a position three events in; B arrives
    // later with nothing.
    let mut a = Watcher::attach(&base, "f", None);
    let mut first = Watcher::attach(&base, "f", None);
    first.wait_events(3).await;
    let c_prefix: Vec<String> = first.seen.iter().map(|e| e.data.clone()).collect();
    let c_after = first.seen[2].id.clone().expect("resumable id");
    drop(first);
    let mut c = Watcher::attach(&base, "f", Some(c_after));
    wait_steps(&db, "f", 1).await;
    let mut b = Watcher::attach(&base, "f", None);
    a.wait_events(4).await;
    b.wait_events(1).await;
    c.wait_events(1).await;
    assert_eq!(
        consumers(&nats, &db).await,
        1,
        "three attachers of one run on one process read it with one consumer"
    );
    let metrics = reqwest::get(api.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nspool_attach_feeds 1\n") && metrics.contains("\nspool_attachers 3\n"),
        "{metrics}"
    );

    // The executor dies mid-run and comes back: the run is replayed (a reset, the whole output).
    wait_steps(&db, "f", 2).await;
    executor.signal(Signal::SIGKILL);
    executor.wait_exit(Duration::from_secs(10)).await;
    let _executor = SpoolProcess::start(Binary::Spool, &db, "owner", &env_refs(&env)).await;

    let (a, b, c) = (
        a.until_end().await,
        b.until_end().await,
        c.until_end().await,
    );
    for (name, prefix, events) in [("A", vec![], &a), ("B", vec![], &b), ("C", c_prefix, &c)] {
        assert_eq!(
            render(prefix, events),
            ticks(40),
            "{name} renders every tick once: {events:?}"
        );
        let last = events.last().unwrap();
        assert_eq!(
            (last.event.as_str(), last.data.as_str()),
            ("done", "{\"ticks\":40}"),
            "{name}"
        );
        assert!(
            !events.iter().any(|e| e.event == "unavailable"),
            "{name}: {events:?}"
        );
    }
    assert!(
        a.iter().any(|e| e.event == "reset"),
        "A was attached across the crash and was told to clear: {a:?}"
    );
    assert_eq!(
        wait_terminal(&db, "f", Duration::from_secs(30)).await,
        "succeeded"
    );
    wait_until(
        "the feed's consumer to go once its attachers left",
        Duration::from_secs(30),
        || async { (consumers(&nats, &db).await == 0).then_some(()) },
    )
    .await;
}
