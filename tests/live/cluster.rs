//! Live output on a three-node NATS cluster with the stream replicated three times: a node
//! SIGKILLed mid-stream (the stream's leader, which is also the node the spool processes talk
//! to) loses no chunk and shows none twice.

use std::time::Duration;

use super::*;
use common::nats::NatsCluster;

/// Environment of a spool process on `cluster`, with a stream of this test's own, kept on all
/// three nodes.
fn cluster_env(db: &TestDb, cluster: &NatsCluster) -> Vec<(String, String)> {
    vec![
        ("NATS_URL".into(), cluster.urls()),
        ("SPOOL_NATS_REPLICAS".into(), "3".into()),
        ("SPOOL_NATS_STREAM".into(), format!("S_{}", db.name)),
        (
            "SPOOL_NATS_SUBJECT_PREFIX".into(),
            format!("out_{}", db.name),
        ),
    ]
}

/// The stream's leader and its replicas, asked of any node still up.
async fn placement(cluster: &NatsCluster, stream: &str, skip: &[&str]) -> Option<(String, usize)> {
    for node in cluster
        .nodes
        .iter()
        .filter(|n| !skip.contains(&n.name.as_str()))
    {
        let Ok(client) = async_nats::connect(node.url()).await else {
            continue;
        };
        let js = async_nats::jetstream::new(client);
        let Ok(mut s) = js.get_stream(stream).await else {
            continue;
        };
        let Ok(info) = s.info().await else { continue };
        let c = info.cluster.clone()?;
        let current = c.replicas.iter().filter(|r| r.current).count();
        return Some((c.leader?, current));
    }
    None
}

/// The events in short: runs of chunks as `tick-a..tick-b`, other events by kind and data.
fn summary(events: &[SseEvent]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(String, String)> = None;
    for e in events {
        if e.event == "chunk" {
            run = Some(match run.take() {
                Some((first, _)) => (first, e.data.clone()),
                None => (e.data.clone(), e.data.clone()),
            });
            continue;
        }
        if let Some((a, b)) = run.take() {
            out.push(format!("{a}..{b}"));
        }
        out.push(format!("{}({}) id {:?}", e.event, e.data, e.id));
    }
    if let Some((a, b)) = run {
        out.push(format!("{a}..{b}"));
    }
    out.join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_mid_stream_attachers_see_every_chunk_once_then_the_end() {
    let db = TestDb::new().await;
    let mut cluster = NatsCluster::start().await;
    let env = cluster_env(&db, &cluster);
    let stream = format!("S_{}", db.name);
    // the executor and the API in separate processes: the API's feed and the executor's
    // publisher each lose their node
    let worker = SpoolProcess::start(Binary::Spool, &db, "worker", &env_refs(&env)).await;
    let mut api_env = env_refs(&env);
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;
    let (leader, _) = wait_until(
        "the stream to be on all three nodes",
        Duration::from_secs(30),
        || async {
            placement(&cluster, &stream, &[])
                .await
                .filter(|(_, current)| *current == 2)
        },
    )
    .await;

    const N: usize = 240;
    ticker(&db, "c", N, 25, 12).await; // about 6 s of output
    let base = api.url("");
    let early = {
        let base = base.clone();
        tokio::spawn(async move { collect(&base, "c", None, 10_000).await })
    };
    wait_steps(&db, "c", 3).await;
    cluster.kill(&leader);
    let (new_leader, _) = wait_until(
        "another node to lead the stream",
        Duration::from_secs(30),
        || async {
            placement(&cluster, &stream, &[leader.as_str()])
                .await
                .filter(|(l, _)| *l != leader)
        },
    )
    .await;
    let late = collect(&base, "c", None, 10_000).await;
    let early = early.await.unwrap();
    assert_eq!(
        wait_terminal(&db, "c", Duration::from_secs(60)).await,
        "succeeded"
    );
    for (name, events) in [("from the start", &early), ("after the kill", &late)] {
        assert_eq!(
            chunks(events),
            ticks(N),
            "{name}: every chunk once, in order (leader {leader} killed, {new_leader} took over): {}\nworker:\n{}\napi:\n{}",
            summary(events),
            worker.log_text(),
            api.log_text()
        );
        let last = events.last().unwrap();
        assert_eq!(
            (last.event.as_str(), last.data.as_str()),
            ("done", format!("{{\"ticks\":{N}}}").as_str()),
            "{name}"
        );
    }
}
