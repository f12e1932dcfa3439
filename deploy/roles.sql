-- Spool's least-privilege roles. Run as the owner of the `spool` schema (the role that runs
-- `spool migrate`), after migrating, and again after every upgrade: it is idempotent, and its
-- grants cover the tables and functions that exist when it runs.
--
--   spool_executor  `spool serve` (executors and the HTTP API): reads and writes the rows of
--                   Spool's tables, calls its functions; no DDL, so start it with --no-migrate
--                   (or let it find the schema current: it then runs no DDL either).
--                   Executors terminate a stale session of their own executor id: give every
--                   executor the same login role (PostgreSQL lets a role end its own sessions),
--                   or grant it pg_signal_backend.
--   spool_enqueuer  enqueues (INSERT into spool.runs, RETURNING id, or spool.enqueue(...)) and
--                   reads the runs it knows the id of (spool.run_status(id)); nothing else.
--   spool_reader    the views for a psql prompt: run_progress, queue_depth, unrunnable_runs,
--                   executor_liveness.
--
-- They are group roles (NOLOGIN); make login roles members of them, for example:
--   create role orders_app login password '…' in role spool_enqueuer;

do $$
begin
    if not exists (select from pg_roles where rolname = 'spool_executor') then
        create role spool_executor nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'spool_enqueuer') then
        create role spool_enqueuer nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'spool_reader') then
        create role spool_reader nologin;
    end if;
end $$;

grant usage on schema spool to spool_executor, spool_enqueuer, spool_reader;

grant select, insert, update, delete on all tables in schema spool to spool_executor;
grant usage, select on all sequences in schema spool to spool_executor;
grant execute on all functions in schema spool to spool_executor;

grant insert (id, workflow, input, queue, concurrency_key, priority, run_at, max_attempts, key_policy)
    on spool.runs to spool_enqueuer;
grant select (id) on spool.runs to spool_enqueuer; -- INSERT … RETURNING id
grant execute on function spool.enqueue(text, jsonb, text, text, text, int, timestamptz, int, text),
                          spool.run_status(text)
    to spool_enqueuer;

grant select on spool.run_progress, spool.queue_depth, spool.unrunnable_runs, spool.executor_liveness
    to spool_reader;
