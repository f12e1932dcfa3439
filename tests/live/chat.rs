//! `llm.chat` against the mock provider (`spool::llm::mock`, served by the test): streaming,
//! coalescing, memoization, every injectable fault, bad keys and models, a kill mid-answer,
//! cancel mid-answer and the `replace` key policy.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::common::nats::NatsServer;
use crate::common::process::{Binary, SpoolProcess};
use crate::common::{wait_terminal, wait_until, TestDb};
use crate::{chunks, collect, env_refs, live_env};

const KEY: &str = "sk-test-NEVER-LOGGED-0123456789";

/// Serves the mock (requiring `KEY`) and returns its base URL as the SDKs take it (`…/v1`).
async fn mock() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        async move { axum::serve(listener, spool::llm::mock::router(Some(KEY.into()))).await },
    );
    format!("http://{addr}/v1")
}

async fn mock_stats(base: &str) -> Value {
    let url = format!("{}/stats", base.trim_end_matches("/v1"));
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn chat_env(db: &TestDb, nats: &NatsServer, base: &str, key: &str) -> Vec<(String, String)> {
    let mut env = live_env(db, nats);
    env.push(("SPOOL_LLM_BASE_URL".into(), base.into()));
    env.push(("SPOOL_LLM_API_KEY".into(), key.into()));
    env.push(("SPOOL_LLM_FIRST_TOKEN_TIMEOUT_MS".into(), "1000".into()));
    env
}

async fn enqueue_chat(db: &TestDb, id: &str, model: &str, extra: &str) {
    let input = json!({"model": model, "messages": [{"role": "user", "content": format!("hello from {id}")}]});
    db.exec(&format!(
        "insert into spool.runs (id, workflow, input{}) values ('{id}', 'llm.chat', '{input}'{})",
        if extra.is_empty() {
            ""
        } else {
            ", concurrency_key, key_policy"
        },
        extra
    ))
    .await;
}

fn reply(tokens: usize) -> String {
    (1..=tokens).map(|i| format!("t{i} ")).collect()
}

async fn row(db: &TestDb, sql: &str) -> Value {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get::<_, Value>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_reply_streams_coalesced_is_memoized_and_is_the_runs_output() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let env = chat_env(&db, &nats, &base, KEY);
    let p = SpoolProcess::start(Binary::Spool, &db, "chat", &env_refs(&env)).await;
    enqueue_chat(&db, "c1", "mock:tokens=60,delay_ms=5", "").await;
    let events = collect(&p.url(""), "c1", None, 10_000).await;
    let text: String = chunks(&events).concat();
    assert_eq!(text, reply(60), "{events:?}");
    assert!(
        chunks(&events).len() < 30,
        "deltas are coalesced: {} chunks for 60 tokens",
        chunks(&events).len()
    );
    let end = events.last().unwrap();
    assert_eq!(end.event, "done");
    assert_eq!(
        serde_json::from_str::<Value>(&end.data).unwrap(),
        json!({"role": "assistant", "content": reply(60)})
    );
    assert_eq!(
        wait_terminal(&db, "c1", Duration::from_secs(30)).await,
        "succeeded"
    );
    let step = row(
        &db,
        "select output from spool.operation_outputs where run_id = 'c1' and name = 'completion'",
    )
    .await;
    assert_eq!(step["finish_reason"], "stop");
    assert_eq!(step["usage"]["completion_tokens"], 60);

    // A replay after the step committed never calls the model again.
    let before = mock_stats(&base).await["requests"].as_u64().unwrap();
    db.exec("update spool.runs set status = 'queued', executor_id = null, finished_at = null, output = null where id = 'c1'").await;
    assert_eq!(
        wait_terminal(&db, "c1", Duration::from_secs(30)).await,
        "succeeded"
    );
    assert_eq!(
        mock_stats(&base).await["requests"].as_u64().unwrap(),
        before
    );
    assert_eq!(
        row(&db, "select output from spool.runs where id = 'c1'").await,
        json!({"role": "assistant", "content": reply(60)})
    );

    // The key is in no run, step or log line.
    let stored = row(&db, "select jsonb_build_array((select jsonb_agg(r) from spool.runs r), (select jsonb_agg(o) from spool.operation_outputs o))").await;
    assert!(!stored.to_string().contains("NEVER-LOGGED"));
    assert!(!p.log_text().contains("NEVER-LOGGED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_injected_fault_is_retried_and_the_reply_arrives_whole_once() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let env = chat_env(&db, &nats, &base, KEY);
    let p = SpoolProcess::start(Binary::Spool, &db, "chat", &env_refs(&env)).await;
    let faults = [
        ("f429", "fault=429,retry_after=1"),
        ("f500", "fault=500"),
        ("fcut", "fault=cut,at=8"),
        ("fbad", "fault=malformed,at=8"),
        ("fstall", "fault=stall,at=8"),
    ];
    for (id, fault) in faults {
        enqueue_chat(&db, id, &format!("mock:tokens=20,delay_ms=5,{fault}"), "").await;
    }
    for (id, fault) in faults {
        assert_eq!(
            wait_terminal(&db, id, Duration::from_secs(60)).await,
            "succeeded",
            "{fault}: {}",
            row(
                &db,
                &format!("select coalesce(error, 'null') from spool.runs where id = '{id}'")
            )
            .await
        );
        let events = collect(&p.url(""), id, None, 10_000).await;
        assert_eq!(chunks(&events).concat(), reply(20), "{fault}: {events:?}");
        assert_eq!(
            row(
                &db,
                &format!("select output from spool.runs where id = '{id}'")
            )
            .await["content"],
            reply(20),
            "{fault}"
        );
    }
    // each fault hit one request, and the retry succeeded
    assert_eq!(mock_stats(&base).await["requests"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_or_an_unknown_model_fails_the_run_with_the_providers_message() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let wrong = "sk-wrong-ALSO-SECRET-9876543210";
    let env = chat_env(&db, &nats, &base, wrong);
    let p = SpoolProcess::start(Binary::Spool, &db, "chat", &env_refs(&env)).await;
    enqueue_chat(&db, "badkey", "mock", "").await;
    assert_eq!(
        wait_terminal(&db, "badkey", Duration::from_secs(30)).await,
        "failed"
    );
    let error = row(&db, "select error from spool.runs where id = 'badkey'").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key"),
        "{error}"
    );
    assert!(!error.to_string().contains("ALSO-SECRET"));
    assert!(!p.log_text().contains("ALSO-SECRET"));
    drop(p);

    let env = chat_env(&db, &nats, &base, KEY);
    let _p = SpoolProcess::start(Binary::Spool, &db, "chat2", &env_refs(&env)).await;
    enqueue_chat(&db, "nomodel", "gpt-nonexistent", "").await;
    assert_eq!(
        wait_terminal(&db, "nomodel", Duration::from_secs(30)).await,
        "failed"
    );
    let error = row(&db, "select error from spool.runs where id = 'nomodel'").await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{error}"
    );
    // unknown input fields are refused before any call
    db.exec(r#"insert into spool.runs (id, workflow, input) values ('odd', 'llm.chat', '{"model": "mock", "messages": [], "stream": false}')"#).await;
    assert_eq!(
        wait_terminal(&db, "odd", Duration::from_secs(30)).await,
        "failed"
    );
    let error = row(&db, "select error from spool.runs where id = 'odd'").await;
    assert_eq!(error["code"], "invalid_input", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_mid_answer_replays_the_reply_and_an_attacher_sees_it_whole_once() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let env = chat_env(&db, &nats, &base, KEY);
    let mut api_env = env_refs(&env);
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;
    let mut owner = SpoolProcess::start(Binary::Spool, &db, "owner", &env_refs(&env)).await;
    enqueue_chat(&db, "k", "mock:tokens=80,delay_ms=20", "").await;
    let base_url = api.url("");
    let attacher = tokio::spawn(async move { collect(&base_url, "k", None, 10_000).await });
    wait_until(
        "the reply to be partly streamed",
        Duration::from_secs(30),
        || async { (mock_stats(&base).await["tokens"].as_u64().unwrap() >= 20).then_some(()) },
    )
    .await;
    owner.signal(Signal::SIGKILL);
    owner.wait_exit(Duration::from_secs(10)).await;
    let _owner = SpoolProcess::start(Binary::Spool, &db, "owner", &env_refs(&env)).await;
    let events = attacher.await.unwrap();
    let reset = events.iter().position(|e| e.event == "reset");
    let after = &events[reset.map_or(0, |i| i + 1)..];
    assert_eq!(chunks(after).concat(), reply(80), "{events:?}");
    assert_eq!(events.last().unwrap().event, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_answer_closes_the_request_and_keeps_the_partial_reply() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let env = chat_env(&db, &nats, &base, KEY);
    let p = SpoolProcess::start(Binary::Spool, &db, "chat", &env_refs(&env)).await;
    enqueue_chat(&db, "x", "mock:tokens=2000,delay_ms=5", "").await;
    let first = collect(&p.url(""), "x", None, 2).await;
    assert_eq!(first.len(), 2, "generating");
    db.exec("select spool.cancel_run('x')").await;
    assert_eq!(
        wait_terminal(&db, "x", Duration::from_secs(10)).await,
        "cancelled"
    );
    let error = row(&db, "select error from spool.runs where id = 'x'").await;
    let partial = error["partial"]["content"].as_str().unwrap().to_string();
    assert!(
        !partial.is_empty() && partial.len() < reply(2000).len(),
        "{error}"
    );
    assert!(reply(2000).starts_with(&partial));
    wait_until(
        "the mock to see the request closed",
        Duration::from_secs(10),
        || async { (mock_stats(&base).await["disconnected"] == 1).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replace_enqueue_cancels_the_running_answer_of_its_key_and_runs_next() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let env = chat_env(&db, &nats, &base, KEY);
    let p = SpoolProcess::start(Binary::Spool, &db, "chat", &env_refs(&env)).await;
    enqueue_chat(
        &db,
        "m1",
        "mock:tokens=2000,delay_ms=5",
        ", 'conv', 'queue'",
    )
    .await;
    enqueue_chat(
        &db,
        "m2",
        "mock:tokens=2000,delay_ms=5",
        ", 'conv', 'queue'",
    )
    .await;
    let first = collect(&p.url(""), "m1", None, 1).await;
    assert_eq!(first.len(), 1, "m1 is generating");
    enqueue_chat(
        &db,
        "m3",
        "mock:tokens=10,delay_ms=1",
        ", 'conv', 'replace'",
    )
    .await;
    assert_eq!(
        wait_terminal(&db, "m1", Duration::from_secs(10)).await,
        "cancelled"
    );
    assert_eq!(
        wait_terminal(&db, "m2", Duration::from_secs(10)).await,
        "cancelled"
    );
    assert_eq!(
        row(&db, "select error->'code' from spool.runs where id = 'm2'").await,
        json!("replaced")
    );
    assert_eq!(
        wait_terminal(&db, "m3", Duration::from_secs(30)).await,
        "succeeded"
    );
    assert_eq!(
        row(
            &db,
            "select output->'content' from spool.runs where id = 'm3'"
        )
        .await,
        json!(reply(10))
    );
}

/// Reads a key stream until `ends` end events arrived.
async fn follow_key(
    base: &str,
    key: &str,
    last_event_id: Option<&str>,
    ends: usize,
) -> Vec<spool::sse_client::SseEvent> {
    use futures::StreamExt;
    let mut req = reqwest::Client::new().get(format!("{base}/v1/keys/{key}/stream"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut events = Box::pin(spool::sse_client::parse(res.bytes_stream()));
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while out
            .iter()
            .filter(|e: &&spool::sse_client::SseEvent| e.is_end())
            .count()
            < ends
        {
            out.push(events.next().await.expect("stream open").expect("event"));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{ends} ends in time: {out:?}"));
    out
}

/// Splits a key stream into (run id, the text it renders: `reset` clears) per `run` frame.
fn per_run(events: &[spool::sse_client::SseEvent]) -> Vec<(String, String)> {
    let mut runs: Vec<(String, String)> = Vec::new();
    for e in events {
        match e.event.as_str() {
            "run" => {
                let frame: Value = serde_json::from_str(&e.data).unwrap();
                runs.push((frame["run_id"].as_str().unwrap().to_string(), String::new()));
            }
            "reset" => runs.last_mut().unwrap().1.clear(),
            "chunk" => runs.last_mut().unwrap().1.push_str(&e.data),
            _ => {}
        }
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_per_conversation_follows_its_runs_across_a_crash_and_resumes_with_last_event_id() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let base = mock().await;
    let env = chat_env(&db, &nats, &base, KEY);
    let mut api_env = env_refs(&env);
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;
    // attached before the conversation has any run
    let api_url = api.url("");
    let follower = tokio::spawn(async move { follow_key(&api_url, "conv", None, 2).await });
    let mut owner = SpoolProcess::start(Binary::Spool, &db, "owner", &env_refs(&env)).await;
    enqueue_chat(&db, "q1", "mock:tokens=60,delay_ms=10", ", 'conv', 'queue'").await;
    enqueue_chat(&db, "q2", "mock:tokens=30,delay_ms=5", ", 'conv', 'queue'").await;
    wait_until(
        "q1 to be partly streamed",
        Duration::from_secs(30),
        || async { (mock_stats(&base).await["tokens"].as_u64().unwrap() >= 15).then_some(()) },
    )
    .await;
    owner.signal(Signal::SIGKILL);
    owner.wait_exit(Duration::from_secs(10)).await;
    let _owner = SpoolProcess::start(Binary::Spool, &db, "owner", &env_refs(&env)).await;

    let events = follower.await.unwrap();
    assert_eq!(
        per_run(&events),
        [("q1".to_string(), reply(60)), ("q2".to_string(), reply(30))],
        "{events:?}"
    );
    for e in &events {
        let id = e.id.as_deref().expect("every event has an id");
        assert!(id.split_once('.').is_some(), "{id}");
    }

    // A reload resumes exactly where it was: after q1's last chunk, it gets q1's end, then q2.
    let ends: Vec<usize> = (0..events.len()).filter(|&i| events[i].is_end()).collect();
    let before_end = &events[ends[0] - 1];
    assert_eq!(before_end.event, "chunk");
    let resumed = follow_key(&api.url(""), "conv", before_end.id.as_deref(), 2).await;
    assert_eq!(resumed[0].event, "done", "{resumed:?}");
    assert_eq!(resumed[0].id, events[ends[0]].id);
    assert_eq!(per_run(&resumed[1..]), [("q2".to_string(), reply(30))]);
}
