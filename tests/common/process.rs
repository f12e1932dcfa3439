//! Real `spool serve` processes for process-level tests: started with their own executor id and
//! port, stopped with real signals.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{wait_until, TestDb};

/// Which binary to run.
#[derive(Debug, Clone, Copy)]
pub enum Binary {
    /// `spool` itself.
    Spool,
    /// `examples/server.rs`: spool plus the `order` and `abort` workflows.
    ExampleServer,
}

impl Binary {
    fn path(self) -> PathBuf {
        let spool = PathBuf::from(env!("CARGO_BIN_EXE_spool"));
        match self {
            Binary::Spool => spool,
            Binary::ExampleServer => {
                let p = spool.parent().unwrap().join("examples").join("server");
                assert!(
                    p.exists(),
                    "{} is missing: `just test` builds the examples first",
                    p.display()
                );
                p
            }
        }
    }
}

pub struct SpoolProcess {
    pub executor_id: String,
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl SpoolProcess {
    /// Starts `serve` and waits until its executor holds its id and its HTTP API answers.
    pub async fn start(bin: Binary, db: &TestDb, executor_id: &str, env: &[(&str, &str)]) -> Self {
        let p = Self::spawn(bin, db, executor_id, env);
        p.wait_alive(db).await;
        // the executor holds its id before the HTTP listener is bound
        p.wait_http().await;
        p
    }

    /// Starts `serve` without waiting.
    pub fn spawn(bin: Binary, db: &TestDb, executor_id: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_with_args(bin, db, executor_id, env, &[])
    }

    /// Starts `serve` with extra arguments, without waiting.
    pub fn spawn_with_args(
        bin: Binary,
        db: &TestDb,
        executor_id: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&db.name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{executor_id}-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin.path());
        cmd.arg("serve")
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("SPOOL_EXECUTOR_ID", executor_id)
            .env("SPOOL_LISTEN", format!("127.0.0.1:{port}"))
            .env("SPOOL_POLL_INTERVAL_MS", "100")
            .env("SPOOL_RECOVERY_INTERVAL_MS", "500")
            .env(
                "RUST_LOG",
                std::env::var("SPOOL_TEST_PROCESS_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("SPOOL_API_TOKEN")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn spool");
        Self {
            executor_id: executor_id.to_string(),
            port,
            log,
            child,
        }
    }

    /// Waits until this process's executor is alive (holds its lock) in the database.
    pub async fn wait_alive(&self, db: &TestDb) {
        let pid = self.child.id();
        wait_until(
            &format!("executor {} (pid {pid}) to come up", self.executor_id),
            Duration::from_secs(30),
            || async {
                let row = db
                    .client()
                    .await
                    .query_opt(
                        "select 1 from spool.executor_liveness l
                      where l.id = $1 and l.alive",
                        &[&self.executor_id],
                    )
                    .await
                    .ok()
                    .flatten();
                row.map(|_| ())
            },
        )
        .await;
    }

    /// Waits until the HTTP API answers `/healthz`.
    pub async fn wait_http(&self) {
        let url = self.url("/healthz");
        wait_until(
            &format!("{url} to answer"),
            Duration::from_secs(30),
            || async {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            },
        )
        .await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("signal");
    }

    /// Sends SIGSTOP and waits until the kernel reports the process stopped: `kill` returns
    /// before the target stops, and a process that runs on for a moment can still act (reconnect,
    /// take a lock) after the test believes it frozen.
    pub async fn stop_and_wait_stopped(&self) {
        self.signal(Signal::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.child.id());
        wait_until(
            "every thread of the process to be stopped",
            Duration::from_secs(10),
            || {
                let tasks = tasks.clone();
                async move {
                    let all_stopped = std::fs::read_dir(&tasks).ok()?.all(|task| {
                        let stat = task.map(|t| t.path().join("stat")).ok();
                        let text = stat.and_then(|p| std::fs::read_to_string(p).ok());
                        // the state follows the parenthesised command name
                        text.as_deref()
                            .and_then(|t| t.rsplit_once(')'))
                            .and_then(|(_, rest)| rest.trim_start().chars().next())
                            == Some('T')
                    });
                    all_stopped.then_some(())
                }
            },
        )
        .await;
    }

    /// Waits for the process to exit (polling with a deadline).
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = &mut self.child;
        let end = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if tokio::time::Instant::now() > end {
                panic!("process did not exit within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval of a deadline wait
        }
    }

    /// True once the process has exited (without waiting).
    pub fn try_exited(&mut self) -> bool {
        self.try_status().is_some()
    }

    /// The exit status once the process has exited (without waiting).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// A counter or gauge from `/metrics`, `None` when the process does not export it (or its
    /// HTTP API does not answer).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for SpoolProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // a failing test shows what its processes logged
        if std::thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(150)..].join("\n");
            eprintln!(
                "--- spool process {}, last 150 log lines ---\n{tail}",
                self.executor_id
            );
        }
    }
}
