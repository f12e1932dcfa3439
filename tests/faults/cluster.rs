//! A cluster for fault scenarios: a private nats-server and executors `spool-1`..`spool-n` (the
//! example server, which has the `ledger_ticker` oracle workflow) on one test database, plus the
//! oracle tables: the steps' ledger and a log of terminal transitions. A relayed cluster
//! (`start_relayed`) reaches Postgres and NATS through a [`Relay`] per process, so a test can
//! freeze, black-hole or heal one node's network.

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::nats::NatsServer;
use crate::common::process::{Binary, SpoolProcess};
use crate::common::relay::Relay;
use crate::common::{wait_until, TestDb};

/// Oracle tables outside Spool's schema. The trigger only observes terminal transitions.
pub const ORACLE_SQL: &str = "
create table if not exists example_ledger (
    id bigserial primary key, run_id text not null, step text not null,
    idempotency_key text not null, executed_at timestamptz not null default clock_timestamp());
create table if not exists example_step_ledger (
    id bigserial primary key, run_id text not null, key text, step int not null,
    attempt int not null, executor text not null,
    executed_at timestamptz not null default clock_timestamp());
create table terminal_log (run_id text not null, status text not null,
    at timestamptz not null default clock_timestamp());
create function log_terminal() returns trigger language plpgsql as $$
begin
    insert into terminal_log (run_id, status) values (new.id, new.status);
    return null;
end $$;
create trigger log_terminal after update of status on spool.runs for each row
    when (new.status in ('succeeded', 'failed', 'cancelled', 'dead')
          and old.status is distinct from new.status)
    execute function log_terminal();
";

/// One process's network: its way to Postgres (every connection it opens) and to NATS.
pub struct NodeRelays {
    pub pg: Relay,
    pub nats: Relay,
}

impl NodeRelays {
    pub fn freeze(&self) {
        self.pg.freeze();
        self.nats.freeze();
    }
    pub fn black_hole(&self) {
        self.pg.black_hole();
        self.nats.black_hole();
    }
    pub fn heal(&self) {
        self.pg.heal();
        self.nats.heal();
    }
}

pub struct Cluster {
    pub db: TestDb,
    pub nats: NatsServer,
    pub procs: Vec<Option<SpoolProcess>>,
    env: Vec<(String, String)>,
    /// With relays: each process's current network, by executor index.
    relays: Vec<Option<NodeRelays>>,
    /// Relays of processes replaced since: kept (never dropped) so that a black-holed dead
    /// process's sessions stay open on the server until the test ends.
    retired: Vec<NodeRelays>,
    relayed: bool,
}

impl Cluster {
    pub async fn start(db: TestDb, executors: usize, extra_env: &[(&str, &str)]) -> Self {
        Self::start_with(db, executors, extra_env, false).await
    }

    /// A cluster whose every process reaches Postgres and NATS through relays of its own.
    pub async fn start_relayed(db: TestDb, executors: usize, extra_env: &[(&str, &str)]) -> Self {
        Self::start_with(db, executors, extra_env, true).await
    }

    async fn start_with(
        db: TestDb,
        executors: usize,
        extra_env: &[(&str, &str)],
        relayed: bool,
    ) -> Self {
        db.exec(ORACLE_SQL).await;
        let nats = NatsServer::start().await;
        let mut env: Vec<(String, String)> = vec![
            ("NATS_URL".into(), nats.url()),
            ("SPOOL_NATS_STREAM".into(), format!("S_{}", db.name)),
            (
                "SPOOL_NATS_SUBJECT_PREFIX".into(),
                format!("out_{}", db.name),
            ),
            ("SPOOL_CONCURRENCY".into(), "8".into()),
            ("SPOOL_GRACE_PERIOD_MS".into(), "200".into()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let mut c = Self {
            db,
            nats,
            procs: Vec::new(),
            env,
            relays: Vec::new(),
            retired: Vec::new(),
            relayed,
        };
        for _ in 0..executors {
            c.add().await;
        }
        c
    }

    /// Starts one more executor (`spool-{n+1}`) and returns its index.
    pub async fn add(&mut self) -> usize {
        self.procs.push(None);
        self.relays.push(None);
        let i = self.procs.len() - 1;
        self.restart(i).await;
        i
    }

    /// Executor `i`'s network (a relayed cluster only).
    pub fn relays(&self, i: usize) -> &NodeRelays {
        self.relays[i].as_ref().expect("a relayed cluster")
    }

    /// Fresh relays for a new process `i` (the old ones are kept, see `retired`), and the
    /// environment that points the process at them.
    async fn network_for(&mut self, i: usize) -> Vec<(String, String)> {
        if !self.relayed {
            return Vec::new();
        }
        let mut pg_url = url::Url::parse(&self.db.url).expect("database url");
        let pg_target: SocketAddr = format!(
            "{}:{}",
            pg_url.host_str().unwrap(),
            pg_url.port().unwrap_or(5432)
        )
        .parse()
        .expect("a numeric Postgres address");
        let nats_target: SocketAddr = format!("127.0.0.1:{}", self.nats.port).parse().unwrap();
        let relays = NodeRelays {
            pg: Relay::start(pg_target).await,
            nats: Relay::start(nats_target).await,
        };
        pg_url.set_port(Some(relays.pg.port())).unwrap();
        let env = vec![
            ("DATABASE_URL".to_string(), pg_url.to_string()),
            (
                "NATS_URL".to_string(),
                format!("nats://127.0.0.1:{}", relays.nats.port()),
            ),
        ];
        if let Some(old) = self.relays[i].replace(relays) {
            self.retired.push(old);
        }
        env
    }

    pub fn id(i: usize) -> String {
        format!("spool-{}", i + 1)
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// (Re)starts executor `i` and waits until it holds its id.
    pub async fn restart(&mut self, i: usize) {
        let p = self.spawn(i, &[]).await;
        p.wait_alive(&self.db).await;
        p.wait_http().await;
        self.procs[i] = Some(p);
    }

    /// Starts executor `i` without waiting (it may refuse or wait for its id); in a relayed
    /// cluster, behind fresh relays.
    pub async fn spawn(&mut self, i: usize, extra: &[(&str, &str)]) -> SpoolProcess {
        let network = self.network_for(i).await;
        let mut env = self.env();
        env.extend(network.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        env.extend_from_slice(extra);
        SpoolProcess::spawn(Binary::ExampleServer, &self.db, &Self::id(i), &env)
    }

    pub fn proc(&self, i: usize) -> &SpoolProcess {
        self.procs[i].as_ref().expect("running")
    }

    /// SIGKILLs executor `i` and waits for it to die.
    pub async fn kill(&mut self, i: usize) {
        let mut p = self.procs[i].take().expect("running");
        p.signal(Signal::SIGKILL);
        p.wait_exit(Duration::from_secs(10)).await;
    }

    pub fn base_url(&self, i: usize) -> String {
        self.proc(i).url("")
    }

    /// The executor that owns `run_id` right now, if any.
    pub async fn owner(&self, run_id: &str) -> Option<usize> {
        let row = self
            .db
            .client()
            .await
            .query_opt(
                "select executor_id from spool.runs where id = $1 and status = 'running'",
                &[&run_id],
            )
            .await
            .unwrap()?;
        let owner: String = row.get(0);
        owner
            .strip_prefix("spool-")?
            .parse::<usize>()
            .ok()
            .map(|n| n - 1)
    }

    pub async fn wait_owner(&self, run_id: &str) -> usize {
        wait_until(
            &format!("run {run_id} to be running"),
            Duration::from_secs(30),
            || self.owner(run_id),
        )
        .await
    }

    /// Waits until no run is unfinished.
    pub async fn wait_all_terminal(&self, deadline: Duration) {
        wait_until("every run to finish", deadline, || async {
            (self
                .db
                .scalar_i64("select count(*) from spool.runs where status in ('queued', 'running')")
                .await
                == 0)
                .then_some(())
        })
        .await;
    }

    /// Every process log, for "zero panics".
    pub fn logs(&self) -> String {
        self.procs.iter().flatten().map(|p| p.log_text()).collect()
    }
}
