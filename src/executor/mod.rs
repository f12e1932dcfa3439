//! The executor: holds its executor id, claims runs into worker slots, recovers the runs it owns,
//! and drains on shutdown.
//!
//! The control loop is a `tokio::select!` over a closed set of events (shutdown, lock lost, a run
//! finished, a wake-up, the poll timer, the recovery timer). Claims and recovery happen only in
//! that loop, one after another, so the set of runs in flight is always known when recovery asks
//! which owned runs nobody is executing.
//!
//! Architecture invariant: the executor never runs workflow code inside the loop and never holds
//! a pooled connection across an await that is not a database call.

pub mod batcher;
pub mod identity;
pub mod lease;
mod maintenance;
pub mod metrics;
pub mod probation;
pub mod runner;
mod shutdown;
pub mod slots;
mod upkeep;
pub mod wakeup;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::runs::{self, Claimant, Run};
use crate::db::{DbError, PgTarget};
use crate::workflow::Registry;

pub use identity::{ExecutorLock, IdentityError};
pub use metrics::Metrics;
pub use runner::{discard_chunks, ChunkSinkFactory};

/// Executor settings (the relevant part of [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct ExecutorSettings {
    pub executor_id: String,
    /// Worker slots: runs executing at once (with `adaptive`, the most).
    pub concurrency: usize,
    /// Adapt the runs in flight between a floor and `concurrency` (see [`slots`]).
    pub adaptive: bool,
    /// Most runs claimed per statement.
    pub claim_batch: usize,
    /// Fallback poll interval (jittered ±50%) when no wake-up arrives.
    pub poll_interval: Duration,
    /// How often owned-but-not-executing runs are taken back.
    pub recovery_interval: Duration,
    /// How long in-flight runs may keep going after a shutdown signal before they are released.
    pub grace_period: Duration,
    /// Queues served; `None` serves all.
    pub queues: Option<Vec<String>>,
    /// How long a run's writes keep retrying while the database is unreachable.
    pub db_patience: Duration,
    /// How long to wait at start for the executor id to be released by a process that is still
    /// draining (rolling restart); zero refuses at once.
    pub lock_wait: Duration,
    /// How long a group of suspects runs alone after repeated crashes (see [`probation`]).
    pub probation: Duration,
    /// How often the key sweep looks for keys whose waiting runs nobody made ready.
    pub key_sweep_interval: Duration,
    /// The lease: the executor renews it every quarter and stops executing if it cannot renew
    /// within it (see [`lease`]).
    pub lease: Duration,
    /// Runs of an executor dead (lease expired) this long are adopted by live executors; zero
    /// keeps this executor's runs for its own id and makes it adopt nobody's.
    pub takeover_after: Duration,
    /// Finished runs are deleted this long after they finished (per-queue overrides in
    /// `spool.queue_retention`); `None` keeps them (see [`maintenance`]).
    pub retention: Option<Duration>,
    /// How often this executor asks for the maintenance leases.
    pub maintenance_interval: Duration,
}

impl ExecutorSettings {
    pub fn new(executor_id: impl Into<String>) -> Self {
        Self {
            executor_id: executor_id.into(),
            concurrency: 16,
            adaptive: false,
            claim_batch: 64,
            poll_interval: Duration::from_millis(500),
            recovery_interval: Duration::from_secs(10),
            grace_period: Duration::from_secs(10),
            queues: None,
            db_patience: Duration::from_secs(120),
            lock_wait: Duration::ZERO,
            probation: Duration::from_secs(2),
            key_sweep_interval: Duration::from_secs(1),
            lease: Duration::from_secs(10),
            takeover_after: Duration::from_secs(30),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            maintenance_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A started executor. Dropping it without [`RunningExecutor::shutdown`] aborts everything, like
/// a crash.
pub struct RunningExecutor {
    pub executor_id: String,
    pub incarnation: i64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ExecutorError>>,
}

impl RunningExecutor {
    /// Stops claiming, lets in-flight runs finish within the grace period, releases the rest.
    pub async fn shutdown(self) -> Result<(), ExecutorError> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits for the executor to end on its own (fatal error) or after a shutdown.
    pub async fn wait(mut self) -> Result<(), ExecutorError> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(()),
        }
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Simulates a crash: aborts every task of the executor and closes its connections without
    /// releasing anything.
    pub fn abort(self) {
        self.task.abort();
    }
}

impl Drop for RunningExecutor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes the executor id (refusing when another live process holds it), registers a new
/// incarnation and starts the claim loop.
pub async fn start(
    settings: ExecutorSettings,
    target: PgTarget,
    pool: Pool,
    registry: Registry,
    chunks: ChunkSinkFactory,
    metrics: Arc<Metrics>,
) -> Result<RunningExecutor, ExecutorError> {
    let workflows = registry.names();
    let give_up = Instant::now() + settings.lock_wait;
    let terms = crate::db::executors::LeaseTerms {
        lease_ms: settings.lease.as_millis().min(i32::MAX as u128) as i32,
        takeover_after_ms: settings.takeover_after.as_millis().min(i32::MAX as u128) as i32,
    };
    let deadline = lease::Lease::statement_deadline(settings.lease);
    // While the id is held: a live holder renews its heartbeat every quarter lease, a dead one
    // (a host gone without a FIN) does not. Waiting while the holder's heartbeat stands still
    // lets a restarted id end its dead predecessor's session as soon as that lease expires.
    let mut holder_seen: Option<(chrono::DateTime<chrono::Utc>, Instant)> = None;
    let lock = loop {
        let taken_at = Instant::now();
        match ExecutorLock::acquire(
            &target,
            &settings.executor_id,
            &workflows,
            settings.queues.as_deref(),
            terms,
            deadline,
        )
        .await
        {
            Err(IdentityError::InUse(id)) => {
                let heartbeat = async {
                    let client = pool.get().await?;
                    crate::db::executors::heartbeat_of(&client, &id).await
                }
                .await
                .ok()
                .flatten();
                let standing_still = match (heartbeat, holder_seen) {
                    (Some((at, lease)), None) => {
                        holder_seen = Some((at, Instant::now() + lease + Duration::from_secs(2)));
                        true
                    }
                    (Some((at, _)), Some((seen, until))) => at == seen && Instant::now() < until,
                    (None, _) => false,
                };
                if Instant::now() >= give_up && !standing_still {
                    return Err(IdentityError::InUse(id).into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break (other?, taken_at),
        }
    };
    let (lock, taken_at) = lock;
    let incarnation = lock.incarnation;
    tracing::info!(executor = %settings.executor_id, incarnation, "executor id acquired");
    let stop = CancellationToken::new();
    let (writes, write_tasks) = batcher::Writes::start(pool.clone(), settings.db_patience);
    let deps = Arc::new(runner::RunnerDeps {
        pool: pool.clone(),
        registry,
        chunks,
        metrics,
        executor_id: settings.executor_id.clone(),
        writes,
        db_patience: settings.db_patience,
    });
    let claims = crate::db::claim_pool(&target, &format!("spool-claim:{}", settings.executor_id));
    let control = ControlLoop {
        settings: settings.clone(),
        target,
        pool,
        claims,
        workflows,
        lock,
        lease: lease::Lease::new(settings.lease, taken_at),
        deps,
        tasks: JoinSet::new(),
        slots: if settings.adaptive {
            slots::Slots::adaptive(
                slots::ADAPTIVE_FLOOR.min(settings.concurrency),
                settings.concurrency,
            )
        } else {
            slots::Slots::fixed(settings.concurrency)
        },
        in_flight: HashMap::new(),
        wake: Arc::new(Notify::new()),
        isolation: probation::Isolation::default(),
        _write_tasks: write_tasks.map(AbortOnDrop),
    };
    // every log line of this executor (and of its runs, whose spans are children) names it
    let span = tracing::info_span!("executor", executor_id = %settings.executor_id, incarnation);
    let task = tokio::spawn(control.run(stop.clone()).instrument(span));
    Ok(RunningExecutor {
        executor_id: settings.executor_id,
        incarnation,
        stop,
        task,
    })
}

struct ControlLoop {
    settings: ExecutorSettings,
    target: PgTarget,
    pool: Pool,
    /// The claim and recovery statements' own connections (see [`crate::db::claim_pool`]).
    claims: Pool,
    workflows: Vec<String>,
    lock: ExecutorLock,
    /// When to renew, and whether execution is stopped for want of a renewal.
    lease: lease::Lease,
    deps: Arc<runner::RunnerDeps>,
    /// One task per run in flight; aborting the loop aborts them all.
    tasks: JoinSet<String>,
    /// How many runs may be in flight (fixed, or adapting to what runs take).
    slots: slots::Slots,
    /// Run id → (claim epoch, task) for every run this process is executing.
    in_flight: HashMap<String, (i64, AbortHandle, CancellationToken, Instant)>,
    wake: Arc<Notify>,
    /// Suspects of repeated crashes started alone, and the runs held back meanwhile.
    isolation: probation::Isolation,
    /// The batched-write tasks; they end with the loop (after the drain).
    _write_tasks: [AbortOnDrop<()>; 2],
}

impl ControlLoop {
    async fn run(mut self, stop: CancellationToken) -> Result<(), ExecutorError> {
        let listener_stop = stop.child_token();
        let (cancels, mut cancel_requests) = tokio::sync::mpsc::unbounded_channel();
        let _listener = AbortOnDrop(tokio::spawn(wakeup::listen(
            self.target.clone(),
            self.settings.executor_id.clone(),
            self.wake.clone(),
            cancels,
            listener_stop.clone(),
        )));
        let _maintenance = AbortOnDrop(tokio::spawn(
            maintenance::Maintenance {
                pool: self.pool.clone(),
                executor_id: self.settings.executor_id.clone(),
                retention: self.settings.retention,
                interval: self.settings.maintenance_interval,
                metrics: self.deps.metrics.clone(),
            }
            .run(listener_stop.clone()),
        ));
        let mut next_poll = Instant::now();
        let mut next_recovery = Instant::now();
        let mut next_key_sweep = Instant::now() + jittered(self.settings.key_sweep_interval);
        let mut next_adoption = Instant::now();
        // After a wake-up, one more claim a little later: the rate-limited trigger may have
        // skipped an insert that committed just after the one that notified.
        let mut catch_up: Option<Instant> = None;
        loop {
            if self.lease.renewal_due(Instant::now()) && !self.renew(&stop).await? {
                break;
            }
            if self.lease.lapsed(Instant::now()) && !self.lease.is_fenced() {
                self.self_fence();
            }
            let now = Instant::now();
            if !self.lease.is_fenced() {
                if now >= next_recovery {
                    self.recover().await;
                    self.poll_cancellations().await;
                    next_recovery = Instant::now() + self.settings.recovery_interval;
                }
                if now >= next_key_sweep {
                    self.sweep_keys().await;
                    next_key_sweep = Instant::now() + jittered(self.settings.key_sweep_interval);
                }
                if now >= next_adoption {
                    self.adopt_orphans().await;
                    next_adoption = Instant::now() + jittered(self.settings.poll_interval);
                }
                self.advance_isolation().await;
                if !self.isolation.active() {
                    self.fill_slots().await;
                }
            }
            let wake_at = [
                Some(next_poll),
                Some(next_recovery),
                Some(next_key_sweep),
                Some(next_adoption),
                Some(self.lease.next_renewal()),
                (!self.lease.is_fenced()).then(|| self.lease.valid_until()),
                self.isolation.group().map(|g| g.until),
                catch_up,
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("at least one timer");
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.lock.lost() => {
                    tracing::warn!("executor lock connection lost; reacquiring");
                    if !self.reacquire(&stop).await? {
                        break;
                    }
                }
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.reap(done);
                    // reap everything else that finished meanwhile, so the next claim asks
                    // for all the free slots at once
                    while let Some(done) = self.tasks.try_join_next() {
                        self.reap(done);
                    }
                }
                _ = self.wake.notified() => {
                    catch_up = Some(Instant::now() + Duration::from_millis(10));
                }
                Some(id) = cancel_requests.recv() => self.cancel_in_flight(&id),
                _ = tokio::time::sleep_until(wake_at) => {
                    if catch_up.is_some_and(|t| t <= Instant::now()) {
                        catch_up = None;
                    }
                    if next_poll <= Instant::now() {
                        next_poll = Instant::now() + jittered(self.settings.poll_interval);
                    }
                }
            }
        }
        listener_stop.cancel();
        self.drain().await;
        Ok(())
    }

    /// Claims as many runs as there are free slots, in batches. While busy, it waits until a
    /// quarter of the slots are free, so one claim statement serves many runs instead of one
    /// claim per finished run; an idle executor claims at once.
    async fn fill_slots(&mut self) {
        loop {
            let limit = self.slots.limit();
            let threshold = if self.in_flight.is_empty() {
                1
            } else {
                (limit / 4).max(1)
            };
            let free = limit.saturating_sub(self.in_flight.len());
            if free < threshold || free == 0 {
                return;
            }
            let want = free.min(self.settings.claim_batch);
            let claimed = self
                .within(async {
                    let client = self.claims.get().await?;
                    let who = Claimant {
                        executor_id: &self.settings.executor_id,
                        incarnation: self.lock.incarnation,
                        workflows: &self.workflows,
                        queues: self.settings.queues.as_deref(),
                    };
                    let started = Instant::now();
                    let claimed = runs::claim(&client, &who, want as i64).await;
                    crate::latency::CLAIM.observe(started.elapsed());
                    claimed
                })
                .await;
            match claimed {
                Ok(runs) => {
                    let got = runs.len();
                    self.deps
                        .metrics
                        .claimed
                        .fetch_add(got as u64, Ordering::Relaxed);
                    for run in runs {
                        tracing::debug!(run = %run.id, workflow = %run.workflow, attempt = run.attempt, "claimed");
                        self.spawn(run);
                    }
                    self.slots.claimed(want, got);
                    if got < want {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed");
                    return;
                }
            }
        }
    }

    /// Bounds a statement of the control loop, so a frozen connection cannot freeze the loop,
    /// and never past the moment the lease lapses (the loop must be free to stop executing then).
    async fn within<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let deadline =
            lease::Lease::statement_deadline(self.settings.lease).max(Duration::from_secs(2));
        let mut until = Instant::now() + deadline;
        if !self.lease.is_fenced() {
            until = until.min(self.lease.valid_until());
        }
        tokio::time::timeout_at(until, f)
            .await
            .unwrap_or_else(|_| Err(DbError::Pool(format!("no answer within {deadline:?}"))))
    }

    fn spawn(&mut self, run: Run) {
        let id = run.id.clone();
        let epoch = run.claim_epoch;
        let deps = self.deps.clone();
        let task_id = id.clone();
        let cancel = CancellationToken::new();
        let run_cancel = cancel.clone();
        let span = tracing::info_span!("run", run_id = %id, epoch, workflow = %run.workflow);
        let handle = self.tasks.spawn(
            async move {
                runner::execute(run, deps, run_cancel).await;
                task_id
            }
            .instrument(span),
        );
        self.in_flight
            .insert(id, (epoch, handle, cancel, Instant::now()));
        self.deps
            .metrics
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }

    /// Tells a run executing here that its cancellation was requested (a step that can stop
    /// early, such as an LLM generation, stops now instead of at its next step boundary).
    fn cancel_in_flight(&self, id: &str) {
        if let Some((_, _, cancel, _)) = self.in_flight.get(id) {
            tracing::debug!(run = %id, "cancellation requested while running");
            cancel.cancel();
        }
    }

    /// The periodic catch-up for cancellations whose notification was missed (the listener
    /// was reconnecting): one statement over the runs executing here.
    async fn poll_cancellations(&self) {
        if self.in_flight.is_empty() {
            return;
        }
        let flagged = self
            .within(async {
                let client = self.deps.pool.get().await?;
                crate::db::runs::cancel_requested_of(&client, &self.settings.executor_id).await
            })
            .await;
        // runs it owns but no longer executes (finishing, or left by a crash) are not in flight
        for id in flagged.unwrap_or_default() {
            self.cancel_in_flight(&id);
        }
    }

    fn reap(&mut self, done: Result<String, tokio::task::JoinError>) {
        match done {
            Ok(id) => {
                if let Some((.., started)) = self.in_flight.remove(&id) {
                    self.slots.run_finished(started.elapsed());
                }
            }
            Err(e) => {
                // runner::execute catches workflow panics; an aborted or panicked task is
                // removed by its task id.
                let tid = e.id();
                self.in_flight.retain(|_, (_, h, _, _)| h.id() != tid);
            }
        }
        self.deps
            .metrics
            .in_flight
            .store(self.in_flight.len() as u64, Ordering::Relaxed);
    }
}

/// Sleeps until `at`, or forever when there is no such moment.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn jittered(base: Duration) -> Duration {
    base.mul_f64(0.5 + rand::random::<f64>())
}

/// Aborts a spawned task when dropped, so no task outlives its owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
