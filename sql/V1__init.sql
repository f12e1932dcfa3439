-- Spool's schema, version 1.
--
-- Overview. A *run* is one row of spool.runs: a workflow name, a JSON input and a status.
-- People enqueue with a plain INSERT; every other column has a default. Executors (`spool serve`
-- processes, each with a stable executor id) claim queued runs with one statement that locks with
-- FOR UPDATE SKIP LOCKED, execute them step by step, and record each finished step in
-- spool.operation_outputs. Every write an executor makes for a run is a compare-and-set on the
-- run's claim_epoch, which changes on every claim: a writer whose claim was superseded affects zero
-- rows and stops.
--
-- Runs with the same (queue, concurrency_key) run one at a time, in enqueue order (enqueue_seq).
-- An insert wakes idle executors through a rate-limited NOTIFY (spool.wakeup), never one NOTIFY
-- per row.
--
-- This file is never edited once released; later changes are new migrations.

create schema if not exists spool;

create table spool.runs (
    id text not null default gen_random_uuid()::text,
    workflow text not null,
    input jsonb not null default '{}',
    queue text not null default 'default',
    concurrency_key text null,
    priority int not null default 0,
    run_at timestamptz not null default now(),
    status text not null default 'queued',
    executor_id text null,
    incarnation bigint null,
    claim_epoch bigint not null default 0,
    attempt int not null default 0,
    max_attempts int not null default 5,
    cancel_requested boolean not null default false,
    output jsonb null,
    error jsonb null,
    enqueue_seq bigint generated always as identity,
    created_at timestamptz not null default now(),
    started_at timestamptz null,
    finished_at timestamptz null,
    updated_at timestamptz not null default now(),

    constraint runs_pkey primary key (id),
    constraint runs_id_format check (id ~ '^[A-Za-z0-9_:-]{1,128}$'),
    constraint runs_workflow_format check (workflow ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    constraint runs_queue_format check (queue ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    constraint runs_concurrency_key_length check (concurrency_key is null or length(concurrency_key) between 1 and 1024),
    constraint runs_status_known check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead')),
    constraint runs_attempt_nonnegative check (attempt >= 0),
    constraint runs_max_attempts_positive check (max_attempts between 1 and 1000),
    constraint runs_running_has_owner check (status <> 'running' or executor_id is not null),
    constraint runs_finished_when_terminal check ((status in ('succeeded', 'failed', 'cancelled', 'dead')) = (finished_at is not null))
);

comment on table spool.runs is 'One row per run: a workflow execution. Enqueue with INSERT (workflow, input); everything else has a default.';
comment on column spool.runs.id is 'Run id: letters, digits, -, _ and : (1-128 chars); defaults to a UUID. Part of the NATS subject of the run''s live output.';
comment on column spool.runs.workflow is 'Name of the registered workflow that executes this run.';
comment on column spool.runs.input is 'JSON input handed to the workflow.';
comment on column spool.runs.queue is 'Queue name; executors may serve a subset of queues.';
comment on column spool.runs.concurrency_key is 'Optional key: runs with the same (queue, key) execute one at a time, in enqueue order.';
comment on column spool.runs.priority is 'Lower runs first (among runs whose run_at has come).';
comment on column spool.runs.run_at is 'Earliest time the run may start.';
comment on column spool.runs.status is 'queued, running, succeeded, failed, cancelled or dead (gave up after max_attempts claims).';
comment on column spool.runs.executor_id is 'Stable id of the executor that owns (or last owned) the run.';
comment on column spool.runs.incarnation is 'Which boot of executor_id claimed the run; an older incarnation can no longer write.';
comment on column spool.runs.claim_epoch is 'Changes on every claim; every executor write is conditioned on it (fencing).';
comment on column spool.runs.attempt is 'How many times the run was claimed; counted at claim time, so crashes count too.';
comment on column spool.runs.max_attempts is 'Claims allowed before the run ends dead (default 5).';
comment on column spool.runs.cancel_requested is 'Set to cancel a running run at its next step boundary (see spool.cancel_run).';
comment on column spool.runs.output is 'Workflow output when succeeded.';
comment on column spool.runs.error is 'Error when failed, cancelled or dead: {"code": ..., "message": ...}.';
comment on column spool.runs.enqueue_seq is 'Monotonic enqueue order; per-key order follows it.';

-- The claim walks this index: only queued rows are in it, so finished rows never slow it down.
create index runs_claim_idx on spool.runs (priority, run_at, enqueue_seq) where status = 'queued';
-- Per-key head check: the earliest unfinished run of a (queue, key).
create index runs_key_order_idx on spool.runs (queue, concurrency_key, enqueue_seq)
    where status in ('queued', 'running') and concurrency_key is not null;
-- Recovery: the runs an executor owns.
create index runs_owned_idx on spool.runs (executor_id) where status = 'running';
-- Listing newest first, paged by enqueue_seq.
create index runs_enqueue_seq_idx on spool.runs (enqueue_seq);

create table spool.operation_outputs (
    run_id text not null,
    step int not null,
    name text not null,
    output jsonb null,
    error jsonb null,
    claim_epoch bigint not null,
    started_at timestamptz not null,
    finished_at timestamptz not null default now(),

    constraint operation_outputs_pkey primary key (run_id, step),
    constraint operation_outputs_run_fkey foreign key (run_id) references spool.runs (id) on delete cascade,
    constraint operation_outputs_step_positive check (step >= 1),
    constraint operation_outputs_output_xor_error check ((output is null) <> (error is null))
);

comment on table spool.operation_outputs is 'One row per finished step of a run: its memoized output or error. Replay returns these instead of running the step again.';
comment on column spool.operation_outputs.step is 'Step number within the run, from 1, in execution order.';
comment on column spool.operation_outputs.name is 'Step name; a different name at the same number on replay is a non-determinism error.';
comment on column spool.operation_outputs.claim_epoch is 'Claim epoch of the attempt that recorded the step.';

create table spool.executors (
    id text not null,
    incarnation bigint not null default 1,
    workflows text[] not null default '{}',
    queues text[] null,
    lock_pid int null,
    started_at timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    stopped_at timestamptz null,

    constraint executors_pkey primary key (id),
    constraint executors_id_format check (id ~ '^[A-Za-z0-9_.:-]{1,128}$')
);

comment on table spool.executors is 'One row per executor id. A live executor holds a session advisory lock on a dedicated connection (lock_pid); each boot increments incarnation.';
comment on column spool.executors.workflows is 'Workflows the current incarnation can execute.';
comment on column spool.executors.queues is 'Queues it serves; null means all.';
comment on column spool.executors.lock_pid is 'Backend pid of the connection holding the executor lock.';

-- Rate-limited insert wake-up. An insert into spool.runs tries to lock the single row of this
-- unlogged table with SKIP LOCKED; only the inserter that gets it, and only if the last
-- notification is older than a few milliseconds, sends NOTIFY. Inserters never wait on each other.
-- Executors keep a catch-up claim and a jittered poll for the inserts this can miss.
create unlogged table spool.wakeup (
    id int not null,
    notified_at timestamptz not null default '-infinity',
    constraint wakeup_pkey primary key (id),
    constraint wakeup_single_row check (id = 1)
);
insert into spool.wakeup (id) values (1);

create function spool.notify_runs_inserted() returns trigger
language plpgsql as $$
begin
    perform 1 from spool.wakeup
     where id = 1 and notified_at < clock_timestamp() - interval '2 milliseconds'
       for update skip locked;
    if found then
        update spool.wakeup set notified_at = clock_timestamp() where id = 1;
        perform pg_notify('spool_runs', '');
    end if;
    return null;
end;
$$;

create trigger runs_inserted_wakeup
    after insert on spool.runs
    for each statement execute function spool.notify_runs_inserted();

-- Cancel by SQL: select spool.cancel_run('my-run-id');
-- A queued run ends cancelled at once; a running one is flagged and ends cancelled at its next
-- step boundary. Returns the status after the call, or null for an unknown id.
create function spool.cancel_run(run_id text) returns text
language sql as $$
    update spool.runs
       set status = case when status = 'queued' then 'cancelled' else status end,
           cancel_requested = cancel_requested or status = 'running',
           finished_at = case when status = 'queued' then now() else finished_at end,
           error = case when status = 'queued'
                        then jsonb_build_object('code', 'cancelled', 'message', 'cancelled before it started')
                        else error end,
           executor_id = case when status = 'queued' then null else executor_id end,
           updated_at = now()
     where id = run_id
    returning status;
$$;

comment on function spool.cancel_run(text) is 'Cancel a run: a queued run at once, a running run at its next step boundary.';

-- Views for a psql prompt (\watch 1).

create view spool.executor_liveness as
select e.id,
       e.incarnation,
       (e.stopped_at is null and exists (
            select 1 from pg_stat_activity a
             where a.pid = e.lock_pid and a.application_name = 'spool-lock:' || e.id)) as alive,
       e.heartbeat_at,
       now() - e.heartbeat_at as since_heartbeat,
       (select count(*) from spool.runs r where r.executor_id = e.id and r.status = 'running') as running,
       e.workflows,
       e.queues,
       e.started_at,
       e.stopped_at
  from spool.executors e;

comment on view spool.executor_liveness is 'Executors: alive means its lock connection is connected right now.';

create view spool.run_progress as
select r.id,
       r.enqueue_seq,
       r.workflow,
       r.status,
       r.queue,
       r.concurrency_key,
       r.executor_id,
       r.attempt,
       (select count(*) from spool.operation_outputs o where o.run_id = r.id) as steps_done,
       (select o.name from spool.operation_outputs o where o.run_id = r.id order by o.step desc limit 1) as last_step,
       r.cancel_requested,
       r.created_at,
       r.started_at,
       r.finished_at,
       coalesce(r.finished_at, now()) - coalesce(r.started_at, r.created_at) as elapsed,
       r.error ->> 'message' as error
  from spool.runs r;

comment on view spool.run_progress is 'Runs with step progress; filter or order as you like, e.g. where status = ''running''.';

create view spool.queue_depth as
select r.queue,
       r.concurrency_key,
       count(*) filter (where r.status = 'queued' and r.run_at <= now()) as ready,
       count(*) filter (where r.status = 'queued' and r.run_at > now()) as scheduled,
       count(*) filter (where r.status = 'running') as running,
       min(r.created_at) filter (where r.status = 'queued') as oldest_queued
  from spool.runs r
 where r.status in ('queued', 'running')
 group by r.queue, r.concurrency_key;

comment on view spool.queue_depth is 'Unfinished runs per queue and concurrency key.';

create view spool.unrunnable_runs as
with live as (
    select e.id, e.workflows, e.queues from spool.executor_liveness e where e.alive
), stranded as (
    -- running runs whose owner is not alive: they wait for it to restart
    select r.* from spool.runs r
     where r.status = 'running' and not exists (select 1 from live e where e.id = r.executor_id)
)
select r.id,
       r.workflow,
       r.queue,
       r.status,
       r.executor_id,
       case
           when r.status = 'running' then 'owner executor ' || r.executor_id || ' is not alive; it resumes the run when it restarts'
           when not exists (select 1 from live e where r.workflow = any (e.workflows)
                                                   and (e.queues is null or r.queue = any (e.queues)))
               then 'no live executor runs workflow ' || r.workflow || ' on queue ' || r.queue
           else 'waits behind run ' || (select s.id from stranded s
                                          where s.queue = r.queue and s.concurrency_key = r.concurrency_key
                                          order by s.enqueue_seq limit 1)
                || ' (same concurrency key), whose owner is not alive'
       end as reason,
       r.created_at
  from spool.runs r
 where r.id in (select id from stranded)
    or (r.status = 'queued' and not exists (
            select 1 from live e
             where r.workflow = any (e.workflows)
               and (e.queues is null or r.queue = any (e.queues))))
    or (r.status = 'queued' and r.concurrency_key is not null and exists (
            select 1 from stranded s
             where s.queue = r.queue and s.concurrency_key = r.concurrency_key));

comment on view spool.unrunnable_runs is 'Unfinished runs that no live executor can execute right now, with the reason.';
