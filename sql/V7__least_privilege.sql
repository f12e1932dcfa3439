-- V7: least privilege.
--
-- A role that may only enqueue needs INSERT on spool.runs and nothing more: the insert triggers
-- (the wake-up, the per-key ready flag, the replace policy) run as the schema owner, so the
-- enqueuer needs no rights on spool.wakeup or on other runs. They are SECURITY DEFINER with a
-- fixed search_path, and every name in them is schema-qualified.
--
-- spool.enqueue(...) enqueues without INSERT rights on the table, and spool.run_status(id) reads
-- one run by id (knowing the id is the capability) without SELECT on the table. Neither is
-- executable by PUBLIC: deploy/roles.sql grants them to spool_enqueuer and spool_executor.

alter function spool.notify_runs_inserted() security definer set search_path = pg_catalog, pg_temp;
alter function spool.runs_set_key_ready() security definer set search_path = pg_catalog, pg_temp;
alter function spool.replace_key_work() security definer set search_path = pg_catalog, pg_temp;

create function spool.enqueue(
    workflow text,
    input jsonb default '{}',
    id text default null,
    queue text default 'default',
    concurrency_key text default null,
    priority int default 0,
    run_at timestamptz default null,
    max_attempts int default 5,
    key_policy text default 'queue'
) returns text
language sql security definer set search_path = pg_catalog, pg_temp as $$
    insert into spool.runs (id, workflow, input, queue, concurrency_key, priority, run_at,
                            max_attempts, key_policy)
    values (coalesce(enqueue.id, gen_random_uuid()::text), enqueue.workflow,
            coalesce(enqueue.input, '{}'), coalesce(enqueue.queue, 'default'),
            enqueue.concurrency_key, coalesce(enqueue.priority, 0),
            coalesce(enqueue.run_at, now()), coalesce(enqueue.max_attempts, 5),
            coalesce(enqueue.key_policy, 'queue'))
    returning runs.id;
$$;

comment on function spool.enqueue(text, jsonb, text, text, text, int, timestamptz, int, text) is
    'Enqueue a run; returns its id. For roles that may enqueue but not read or write spool.runs.';

create function spool.run_status(run_id text)
returns table (id text, workflow text, queue text, concurrency_key text, status text,
               attempt int, output jsonb, error jsonb, created_at timestamptz,
               started_at timestamptz, finished_at timestamptz)
language sql stable security definer set search_path = pg_catalog, pg_temp as $$
    select r.id, r.workflow, r.queue, r.concurrency_key, r.status, r.attempt, r.output, r.error,
           r.created_at, r.started_at, r.finished_at
      from spool.runs r
     where r.id = run_status.run_id;
$$;

comment on function spool.run_status(text) is
    'One run by id: status, output, error, times. For roles that may not read spool.runs.';

revoke execute on function spool.enqueue(text, jsonb, text, text, text, int, timestamptz, int, text) from public;
revoke execute on function spool.run_status(text) from public;
