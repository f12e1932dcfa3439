//! An end that reaches NATS late: the executor's connection to NATS freezes before the run ends,
//! and the run ends in Postgres while its last chunks and its end wait in the publisher. An
//! attacher on another process waits for them — the executor is alive and still publishing — and
//! does not take the end from Postgres, which would cut the output short without a word.

use std::time::Duration;

use super::*;
use common::relay::Relay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_published_late_by_a_live_executor_is_awaited_not_replaced_by_the_row() {
    let db = TestDb::new().await;
    let nats = NatsServer::start().await;
    let relay = Relay::start(([127, 0, 0, 1], nats.port).into()).await;
    let env = live_env(&db, &nats);
    // the executor reaches NATS through the relay; the API directly
    let mut worker_env = env_refs(&env);
    let through_relay = format!("nats://127.0.0.1:{}", relay.port());
    worker_env.retain(|(k, _)| *k != "NATS_URL");
    worker_env.push(("NATS_URL", &through_relay));
    let worker = SpoolProcess::start(Binary::Spool, &db, "worker", &worker_env).await;
    let mut api_env = env_refs(&env);
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;

    const N: usize = 40;
    ticker(&db, "late", N, 25, 4).await;
    let base = api.url("");
    let attacher = tokio::spawn(async move { collect(&base, "late", None, 1000).await });
    wait_steps(&db, "late", 2).await;
    relay.freeze();
    assert_eq!(
        wait_terminal(&db, "late", Duration::from_secs(60)).await,
        "succeeded"
    );
    // The publisher tried to send the end in the run and gave it to a background retry: by
    // then (several acknowledgement timeouts after the run ended in Postgres) an attacher that
    // did not wait for a live executor had long taken the end from the row.
    wait_until(
        "the executor to retry the end in the background",
        Duration::from_secs(60),
        || async {
            worker
                .log_text()
                .contains("cannot publish the end of the live output; retrying in the background")
                .then_some(())
        },
    )
    .await;
    relay.heal();
    let events = attacher.await.unwrap();
    assert_eq!(
        chunks(&events),
        ticks(N),
        "every chunk once, in order: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(
        (last.event.as_str(), last.data.as_str()),
        ("done", format!("{{\"ticks\":{N}}}").as_str())
    );
}
