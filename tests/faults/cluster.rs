//! A cluster for fault scenarios: a private nats-server and executors `spool-1`..`spool-n` (the
//! example server, which has the `ledger_ticker` oracle workflow) on one test database, plus the
//! oracle tables: the steps' ledger and a log of terminal transitions.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::common::nats::NatsServer;
use crate::common::process::{Binary, SpoolProcess};
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

pub struct Cluster {
    pub db: TestDb,
    pub nats: NatsServer,
    pub procs: Vec<Option<SpoolProcess>>,
    env: Vec<(String, String)>,
}

impl Cluster {
    pub async fn start(db: TestDb, executors: usize, extra_env: &[(&str, &str)]) -> Self {
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
        };
        for i in 0..executors {
            c.procs.push(None);
            c.restart(i).await;
        }
        c
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
        let p =
            SpoolProcess::start(Binary::ExampleServer, &self.db, &Self::id(i), &self.env()).await;
        self.procs[i] = Some(p);
    }

    /// Starts executor `i` without waiting (it may refuse or wait for its id).
    pub fn spawn(&self, i: usize, extra: &[(&str, &str)]) -> SpoolProcess {
        let mut env = self.env();
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
