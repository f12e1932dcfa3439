//! A private `nats-server -js` per test, which the test may kill and restart on the same port
//! and store.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub async fn start() -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Self {
            port: super::process::free_port(),
            dir,
            child: None,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and store, and waits until it accepts connections.
    pub async fn restart(&mut self) {
        let bin = std::env::var("SPOOL_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = Command::new(bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.join("store"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nats-server (run the suite with `just test`, which installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_until(
            "nats-server to accept connections",
            Duration::from_secs(20),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three `nats-server -js` nodes routed into one cluster, each with its own store, any of which
/// a test may SIGKILL.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

pub struct ClusterNode {
    /// `--server_name`, as JetStream reports it (a stream's leader, its replicas).
    pub name: String,
    pub port: u16,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream answers on each (a meta leader is elected).
    pub async fn start() -> Self {
        let free = super::process::free_port;
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free(), free())).collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster_port))| {
                let name = format!("n{}", i + 1);
                let routes: Vec<String> = ports
                    .iter()
                    .filter(|(p, _)| p != port)
                    .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
                    .collect();
                let args = [
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "--server_name",
                    &name,
                    "--cluster_name",
                    "spool-test",
                    "--cluster",
                    &format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes",
                    &routes.join(","),
                    "-sd",
                    &format!("{{dir}}/{name}"),
                ];
                (name.clone(), *port, args.map(String::from).to_vec())
            })
            .collect();
        Self::start_nodes(nodes).await
    }

    /// Starts nodes given as (server name, client port, arguments), `{dir}` in an argument
    /// standing for a private directory, and waits until JetStream answers on each.
    pub async fn start_nodes(nodes: Vec<(String, u16, Vec<String>)>) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("nats-cluster-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = std::env::var("SPOOL_TEST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
        let mut started = Vec::new();
        for (name, port, args) in nodes {
            let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
            let child = Command::new(&bin)
                .args(["-p", &port.to_string()])
                .args(
                    args.iter()
                        .map(|a| a.replace("{dir}", &dir.to_string_lossy())),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("nats-server (run the suite with `just test`, which installs it)");
            started.push(ClusterNode {
                name,
                port,
                child: Some(child),
            });
        }
        let cluster = Self {
            nodes: started,
            dir,
        };
        for node in &cluster.nodes {
            let url = node.url();
            wait_until(
                &format!("node {} to answer JetStream requests", node.name),
                Duration::from_secs(60),
                || {
                    let url = url.clone();
                    async move {
                        let client = async_nats::connect(url).await.ok()?;
                        async_nats::jetstream::new(client)
                            .query_account()
                            .await
                            .ok()
                            .map(|_| ())
                    }
                },
            )
            .await;
        }
        cluster
    }

    /// Every node's URL, comma-separated: a `NATS_URL`.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(ClusterNode::url).collect();
        urls.join(",")
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node of this cluster")
    }

    /// SIGKILLs the node named `name`: no goodbye to its routes or clients.
    pub fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The contents of a node's log, for a failure message.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
