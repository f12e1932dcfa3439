//! Live output on a three-node NATS cluster with the stream replicated three times: a node
//! SIGKILLed mid-stream (the stream's leader, which is also the node the executor publishes
//! through) loses no chunk and shows none twice.

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

/// The node of `cluster` a process is connected to as a NATS client, from the process's own
/// sockets (`/proc`).
fn node_of(cluster: &NatsCluster, pid: u32) -> Option<String> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().into_owned();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    // columns: sl local_address rem_address st ... uid timeout inode
    let ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let established = cols.get(3)? == &"01";
            let inode = cols.get(9)?;
            let ours = inodes.iter().any(|i| i == inode);
            let port = u16::from_str_radix(cols.get(2)?.split(':').nth(1)?, 16).ok()?;
            (established && ours).then_some(port)
        })
        .collect();
    cluster
        .nodes
        .iter()
        .find(|n| ports.contains(&n.port))
        .map(|n| n.name.clone())
}

/// Makes `to` the stream's leader (a step-down naming it as preferred), and waits until it is.
async fn move_leader(cluster: &NatsCluster, stream: &str, to: &str) {
    let client = async_nats::connect(cluster.urls().split(',').collect::<Vec<_>>())
        .await
        .unwrap();
    let stepdown = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
    let body = format!("{{\"placement\":{{\"preferred\":\"{to}\"}}}}");
    wait_until(
        "the stream's leader to move",
        Duration::from_secs(60),
        || {
            let (client, stepdown, body) = (client.clone(), stepdown.clone(), body.clone());
            async move {
                match placement(cluster, stream, &[]).await {
                    Some((leader, current)) if leader == to && current == 2 => return Some(()),
                    Some((leader, 2)) if leader != to => {
                        let _ = client.request(stepdown, body.into()).await;
                    }
                    _ => {}
                }
                None
            }
        },
    )
    .await;
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
    kill_the_leader_after_step(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_as_the_run_ends_attachers_still_see_every_chunk_once_then_the_end() {
    kill_the_leader_after_step(11).await;
}

/// A 12-step ticker run; once `step` steps are recorded, the stream's leader is SIGKILLed.
async fn kill_the_leader_after_step(step: i64) {
    let db = TestDb::new().await;
    let mut cluster = NatsCluster::start().await;
    let env = cluster_env(&db, &cluster);
    let stream = format!("S_{}", db.name);
    // The executor and the API run in separate processes, and the node to kill is the worst
    // one: the stream's leader, and the node both the executor's publisher and the API's feed
    // are connected to. The executor's NATS_URL lists the three nodes; the API's names only
    // that node (a seed: the client learns the others from it).
    let worker = SpoolProcess::start(Binary::Spool, &db, "worker", &env_refs(&env)).await;
    wait_until(
        "the stream to be on all three nodes",
        Duration::from_secs(30),
        || async {
            placement(&cluster, &stream, &[])
                .await
                .filter(|(_, current)| *current == 2)
        },
    )
    .await;
    let leader = node_of(&cluster, worker.pid()).expect("the worker is connected to a node");
    let seed = cluster.node(&leader).url();
    let mut api_env = env_refs(&env);
    api_env.retain(|(k, _)| *k != "NATS_URL");
    api_env.push(("NATS_URL", &seed));
    api_env.push(("SPOOL_EXECUTOR_ID", "api"));
    let api = SpoolProcess::spawn_with_args(Binary::Spool, &db, "api", &api_env, &["--api-only"]);
    api.wait_http().await;
    move_leader(&cluster, &stream, &leader).await;

    const N: usize = 240;
    ticker(&db, "c", N, 25, 12).await; // about 6 s of output
    let base = api.url("");
    let early = {
        let base = base.clone();
        tokio::spawn(async move { collect(&base, "c", None, 10_000).await })
    };
    wait_steps(&db, "c", step).await;
    cluster.kill(&leader);
    for (who, pid) in [("executor", worker.pid()), ("API", api.pid())] {
        wait_until(
            &format!("the {who} to reconnect to another node"),
            Duration::from_secs(30),
            || async { node_of(&cluster, pid).filter(|n| *n != leader) },
        )
        .await;
    }
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
    let late = {
        let base = base.clone();
        tokio::spawn(async move { collect(&base, "c", None, 10_000).await })
    };
    assert_eq!(
        wait_terminal(&db, "c", Duration::from_secs(60)).await,
        "succeeded"
    );
    let early = early.await.unwrap();
    let late = late.await.unwrap();
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

/// The compose override `deploy/compose/nats-cluster.yml`: its three NATS nodes, started with
/// the file's own commands (host names and ports mapped to this machine), form a JetStream
/// cluster that keeps a stream on all three; every executor lists the three nodes and asks for
/// three replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_nats_cluster_forms_and_keeps_the_stream_on_three_nodes() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/compose/nats-cluster.yml"
    ))
    .unwrap();
    // (service, command) for every service with a command
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    let mut service = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                service = name.to_string();
            }
        }
        if let Some(command) = line.trim().strip_prefix("command: ") {
            let args: Vec<String> = serde_json::from_str(command).expect("a JSON-style list");
            commands.push((service.clone(), args));
        }
    }
    let services: Vec<&str> = commands.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(services, ["nats", "nats-2", "nats-3"]);
    let free = common::process::free_port;
    let ports: Vec<(u16, u16)> = services.iter().map(|_| (free(), free())).collect();
    let nodes = commands
        .iter()
        .zip(&ports)
        .map(|((service, args), (port, cluster_port))| {
            let args: Vec<String> = args
                .iter()
                .map(|a| {
                    let mut a = a.replace("0.0.0.0:6222", &format!("127.0.0.1:{cluster_port}"));
                    for (other, (_, c)) in services.iter().zip(&ports) {
                        a = a.replace(&format!("//{other}:6222"), &format!("//127.0.0.1:{c}"));
                    }
                    a.replace("/data", &format!("{{dir}}/{service}"))
                })
                .chain(["-a".into(), "127.0.0.1".into()])
                .collect();
            let name = args[args.iter().position(|a| a == "--server_name").unwrap() + 1].clone();
            (name, *port, args)
        })
        .collect();
    let cluster = NatsCluster::start_nodes(nodes).await;
    let client = async_nats::connect(cluster.nodes[0].url()).await.unwrap();
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "COMPOSE".into(),
            subjects: vec!["compose.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("a stream with three replicas");
    wait_until(
        "the stream to be current on all three nodes",
        Duration::from_secs(30),
        || async {
            placement(&cluster, "COMPOSE", &[])
                .await
                .filter(|(_, current)| *current == 2)
        },
    )
    .await;

    let urls: Vec<String> = services
        .iter()
        .map(|s| format!("nats://{s}:4222"))
        .collect();
    assert!(
        text.contains(&format!("NATS_URL: {}", urls.join(","))),
        "executors list every node"
    );
    assert!(text.contains("SPOOL_NATS_REPLICAS: \"3\""));
    let base = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    for executor in ["spool-1", "spool-2", "spool-3"] {
        assert!(
            base.contains(&format!("\n  {executor}:")),
            "{executor} in docker-compose.yml"
        );
        assert!(
            text.contains(&format!(
                "\n  {executor}:\n    environment: *spool-on-the-cluster"
            )),
            "{executor} is pointed at the cluster"
        );
    }
}
