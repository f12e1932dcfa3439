//! What every measurement shares: the private servers, a fresh migrated database per section, real
//! `spool serve` processes held in guards (killed on drop, also on error or panic), and waits that
//! always have a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

/// Knobs of the Spool processes under test (from the bench's environment).
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// `SPOOL_CONCURRENCY` of the executors.
    pub concurrency: usize,
    /// `SPOOL_CLAIM_BATCH` of the executors.
    pub claim_batch: usize,
    /// `RUST_LOG` of the processes; `None` keeps Spool's default (info).
    pub log: Option<String>,
}

/// The private servers the bench runs against and where it keeps its files.
#[derive(Debug, Clone)]
pub struct Bench {
    /// `postgres://postgres@127.0.0.1:PORT` (no database).
    pub pg_base: String,
    pub nats_url: String,
    pub spool_bin: PathBuf,
    /// Logs of the Spool processes and their pid files.
    pub work_dir: PathBuf,
    pub spool: SpoolSettings,
    /// Server settings given to every section's database (`alter database … set`), e.g.
    /// `plan_cache_mode=force_custom_plan`: experiments with the planner without changing Spool.
    pub db_settings: Vec<String>,
}

impl Bench {
    pub fn db_url(&self, name: &str) -> String {
        format!("{}/{name}?sslmode=disable", self.pg_base)
    }

    /// Leaves the cluster quiet for the next section: drops the databases earlier sections made
    /// (the retention soak leaves half a gigabyte that autovacuum would still be cleaning while
    /// the next section measures, on the same two cores), then checkpoints. Returns how many
    /// databases it dropped. Every section starts from its own fresh database, so none is needed
    /// again.
    pub async fn settle(&self) -> Result<usize> {
        let admin = connect(&self.db_url("postgres")).await?;
        let names: Vec<String> = admin
            .query(
                "select datname from pg_database
                  where not datistemplate and datname <> 'postgres'",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in &names {
            // `with (force)` also ends an autovacuum worker in it
            admin
                .batch_execute(&format!("drop database if exists \"{name}\" with (force)"))
                .await
                .with_context(|| format!("drop database {name}"))?;
        }
        admin.batch_execute("checkpoint").await?;
        Ok(names.len())
    }

    /// Creates database `name` (dropping a leftover one) and migrates it with `spool migrate`.
    pub async fn fresh_db(&self, name: &str) -> Result<Db> {
        let admin = connect(&self.db_url("postgres")).await?;
        let settings = self
            .db_settings
            .iter()
            .map(|s| format!("alter database {name} set {s}"));
        for sql in [
            format!("drop database if exists {name} with (force)"),
            format!("create database {name}"),
        ]
        .into_iter()
        .chain(settings)
        {
            admin
                .batch_execute(&sql)
                .await
                .with_context(|| format!("create database {name}"))?;
        }
        let url = self.db_url(name);
        let out = Command::new(&self.spool_bin)
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .output()
            .with_context(|| format!("run {} migrate", self.spool_bin.display()))?;
        if !out.status.success() {
            bail!(
                "spool migrate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let client = connect(&url).await?;
        Ok(Db {
            name: name.to_string(),
            url,
            client,
        })
    }

    /// Starts a `spool serve` process (without waiting for it to come up).
    pub fn spawn(&self, db: &Db, spec: ProcSpec) -> Result<SpoolProcess> {
        let port = free_port()?;
        let logs = self.work_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{}-{}-{port}.log", db.name, spec.executor_id));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&self.spool_bin);
        cmd.arg("serve");
        match spec.role {
            Role::Worker => {
                cmd.arg("--worker-only");
            }
            Role::Api => {
                cmd.arg("--api-only");
            }
            Role::Both => {}
        }
        cmd.env_clear();
        // Experiments: SPOOL_* settings in the bench's own environment reach every process
        // (the settings the bench sets itself below win).
        cmd.envs(std::env::vars().filter(|(k, _)| k.starts_with("SPOOL_")));
        cmd.env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .env("SPOOL_EXECUTOR_ID", &spec.executor_id)
            .env("SPOOL_LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if spec.defaults {
            cmd.env_remove("SPOOL_CONCURRENCY")
                .env_remove("SPOOL_CLAIM_BATCH");
        } else {
            cmd.env("SPOOL_CONCURRENCY", self.spool.concurrency.to_string())
                .env("SPOOL_CLAIM_BATCH", self.spool.claim_batch.to_string());
        }
        if let Some(log) = &self.spool.log {
            cmd.env("RUST_LOG", log);
        }
        if spec.nats {
            cmd.env("NATS_URL", &self.nats_url);
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", self.spool_bin.display()))?;
        let pid_file = self.work_dir.join("pids").join(child.id().to_string());
        std::fs::create_dir_all(pid_file.parent().expect("pids dir"))?;
        std::fs::write(&pid_file, &spec.executor_id)?;
        Ok(SpoolProcess {
            executor_id: spec.executor_id,
            port,
            log,
            pid_file,
            child,
        })
    }

    /// Starts a process and waits until it accepts work: its executor is alive in the database
    /// (worker roles) and its HTTP API answers (API roles).
    pub async fn start(&self, db: &Db, spec: ProcSpec) -> Result<SpoolProcess> {
        let role = spec.role;
        let mut p = self.spawn(db, spec)?;
        if role != Role::Api {
            p.wait_alive(db).await?;
        }
        if role != Role::Worker {
            p.wait_http().await?;
        }
        Ok(p)
    }
}

/// A fresh database of one section and the bench's own connection to it.
pub struct Db {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl Db {
    /// Another connection (for concurrent clients).
    pub async fn connect(&self) -> Result<Client> {
        connect(&self.url).await
    }

    /// The cluster's current WAL position, in bytes.
    pub async fn wal_lsn(&self) -> Result<i64> {
        let row = self
            .client
            .query_one("select (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Writes every dirty page out, so the next statements log no full-page images until the
    /// next checkpoint. A drain starts with one, so its WAL does not depend on where the last
    /// checkpoint happened to fall (Spool and the peer alike).
    pub async fn checkpoint(&self) -> Result<()> {
        self.client.batch_execute("checkpoint").await?;
        Ok(())
    }

    /// Where the WAL between two positions went, per record type (pg_walinspect): the largest
    /// `top` types as "type bytes-per-run", and full-page images apart. pg_walinspect reads only
    /// flushed WAL: the end is at most the flush position (what autovacuum wrote since the
    /// last commit may not be flushed yet).
    pub async fn wal_breakdown(&self, from: i64, to: i64, runs: i64, top: usize) -> Result<String> {
        self.client
            .batch_execute("create extension if not exists pg_walinspect")
            .await?;
        let rows = self
            .client
            .query(
                r#"select "resource_manager/record_type", record_size::float8, fpi_size::float8
                     from pg_get_wal_stats('0/0'::pg_lsn + $1::int8,
                                           least('0/0'::pg_lsn + $2::int8, pg_current_wal_flush_lsn()),
                                           true)
                    where count > 0
                    order by combined_size desc"#,
                &[&from, &to],
            )
            .await?;
        let runs = runs.max(1) as f64;
        let fpi: f64 = rows.iter().map(|r| r.get::<_, f64>(2)).sum();
        let mut parts: Vec<String> = rows
            .iter()
            .take(top)
            .map(|r| format!("{} {:.0}", r.get::<_, String>(0), r.get::<_, f64>(1) / runs))
            .collect();
        parts.push(format!("full-page images {:.0}", fpi / runs));
        Ok(parts.join(", "))
    }

    /// Commits recorded for this database so far. Backends report their counts lazily (at most
    /// once a second, and when they exit), so callers stop the processes they measure first;
    /// this connection's own counts are flushed before reading.
    pub async fn commits(&self) -> Result<i64> {
        self.client
            .batch_execute("select pg_stat_force_next_flush()")
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let row = self
            .client
            .query_one(
                "select xact_commit from pg_stat_database where datname = current_database()",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }
}

pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = conn.await; // ends when the client is dropped
    });
    Ok(client)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `--worker-only`: claims and executes, no HTTP.
    Worker,
    /// `--api-only`: HTTP only, claims nothing.
    Api,
    /// Both, as deployed by default.
    Both,
}

/// How to start one `spool serve`.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    pub executor_id: String,
    pub role: Role,
    /// Set `NATS_URL` (live output on).
    pub nats: bool,
    /// Leave SPOOL_CONCURRENCY and SPOOL_CLAIM_BATCH at Spool's defaults (adaptive).
    pub defaults: bool,
    pub env: Vec<(String, String)>,
}

impl ProcSpec {
    pub fn new(executor_id: impl Into<String>, role: Role) -> Self {
        Self {
            executor_id: executor_id.into(),
            role,
            nats: false,
            defaults: false,
            env: Vec::new(),
        }
    }

    /// With live output (`NATS_URL`) on a stream of its own, so sections never share chunks.
    pub fn with_nats(mut self, stream: &str) -> Self {
        self.nats = true;
        self.env("SPOOL_NATS_STREAM", stream.to_uppercase())
            .env("SPOOL_NATS_SUBJECT_PREFIX", format!("{stream}.out"))
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }
}

/// A running `spool serve`; dropping it kills the process.
pub struct SpoolProcess {
    pub executor_id: String,
    pub port: u16,
    pub log: PathBuf,
    pid_file: PathBuf,
    child: Child,
}

impl SpoolProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), sig).context("signal spool")?;
        Ok(())
    }

    /// Warning and error lines in the process's log so far.
    pub fn warnings(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    }

    /// Resident memory right now, in bytes (`VmRSS` of /proc/PID/status).
    pub fn rss_bytes(&self) -> Result<u64> {
        rss_bytes(self.pid())
    }

    /// Fails with the end of the log when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "spool {} exited ({status}); log {}:\n{}",
                self.executor_id,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Waits until this process's executor is alive (holds its lock) in the database.
    pub async fn wait_alive(&mut self, db: &Db) -> Result<()> {
        let id = self.executor_id.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_running()?;
            if executor_alive(db, &id).await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("executor {id} did not come up within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until the HTTP API answers `/healthz`.
    pub async fn wait_http(&mut self) -> Result<()> {
        let url = self.url("/healthz");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_running()?;
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{url} did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("spool {} did not exit within {limit:?}", self.executor_id);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// SIGTERM, then waits for the drain (SIGKILL past the deadline).
    pub async fn stop(mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(15)).await
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

impl Drop for SpoolProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn executor_alive(db: &Db, executor_id: &str) -> Result<bool> {
    let row = db
        .client
        .query_opt(
            "select 1 from spool.executor_liveness where id = $1 and alive",
            &[&executor_id],
        )
        .await?;
    Ok(row.is_some())
}

pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kb * 1024)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `probe` every `every` until it yields a value, failing after `limit`.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut probe: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The `q`-quantile (0..=1) of `values` (nearest rank); 0 for none.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Aborts a task when dropped (a section that fails midway leaves no task behind).
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
