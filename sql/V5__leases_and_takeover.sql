-- Version 5: liveness that expires, and takeover of a dead executor's runs.
--
-- An executor is alive while it holds its executor-id lock AND its heartbeat, written with the
-- database's now(), is younger than its lease (lease_ms, from SPOOL_LEASE_MS). A lock alone is
-- not enough: a host that dies or is partitioned without a FIN keeps its session, and so its
-- lock, until the server's TCP keepalive notices (two hours by default). The executor renews the
-- heartbeat every quarter lease and stops executing on its own before the lease can expire in
-- the database (it measures from when it sent its last successful renewal, on a monotonic clock;
-- the database's heartbeat_at is the later moment the renewal ran, so the executor always stops
-- first).
--
-- Runs of an executor that has not been alive for takeover_after_ms (SPOOL_TAKEOVER_AFTER_MS,
-- default 30 s; 0 keeps them for the same id, as with a StatefulSet) are adopted by live
-- executors: spool.adopt_orphaned_runs() hands them back to the queue with a new claim epoch,
-- and the ordinary claim takes them, with its per-key and attempt rules.

alter table spool.executors
    add column lease_ms int not null default 10000,
    add column takeover_after_ms int not null default 30000,
    add constraint executors_lease_positive check (lease_ms between 100 and 86400000),
    add constraint executors_takeover_range check (takeover_after_ms between 0 and 604800000);

comment on column spool.executors.heartbeat_at is 'Database time of the last lease renewal; the executor is alive while this is younger than lease_ms and it holds its lock.';
comment on column spool.executors.lease_ms is 'The executor''s lease (SPOOL_LEASE_MS): it stops executing if it cannot renew within it.';
comment on column spool.executors.takeover_after_ms is 'How long after its lease expired its runs are adopted by live executors (SPOOL_TAKEOVER_AFTER_MS); 0: never, they wait for the same id.';

create or replace view spool.executor_liveness as
select e.id,
       e.incarnation,
       (e.stopped_at is null
        and e.heartbeat_at > now() - make_interval(secs => e.lease_ms / 1000.0)
        and exists (
            select 1 from pg_stat_activity a
             where a.pid = e.lock_pid and a.application_name = 'spool-lock:' || e.id)) as alive,
       e.heartbeat_at,
       now() - e.heartbeat_at as since_heartbeat,
       (select count(*) from spool.runs r where r.executor_id = e.id and r.status = 'running') as running,
       e.workflows,
       e.queues,
       e.started_at,
       e.stopped_at,
       e.lease_ms,
       e.heartbeat_at + make_interval(secs => e.lease_ms / 1000.0) as lease_expires_at,
       exists (select 1 from pg_stat_activity a
                where a.pid = e.lock_pid and a.application_name = 'spool-lock:' || e.id) as lock_held,
       e.takeover_after_ms,
       case when e.takeover_after_ms > 0
            then e.heartbeat_at + make_interval(secs => (e.lease_ms + e.takeover_after_ms) / 1000.0)
       end as takeover_at
  from spool.executors e;

comment on view spool.executor_liveness is 'Executors: alive means it holds its lock and its lease has not expired; takeover_at is when live executors adopt its running runs if it is not alive by then (null: never).';

-- Hands the running runs of executors dead for longer than their takeover delay back to the
-- queue, at most max_runs per call, with a new claim epoch (nothing their old owner writes is
-- accepted from then on). As on a re-claim after a crash, the attempt stays charged only if the
-- run recorded no step at its last claim epoch. Wakes idle executors. Returns the runs adopted.
create function spool.adopt_orphaned_runs(max_runs int) returns setof text
language sql as $$
    with dead as (
        select e.id from spool.executors e
         where e.takeover_after_ms > 0
           and e.heartbeat_at + make_interval(secs => (e.lease_ms + e.takeover_after_ms) / 1000.0) < now()
    ), orphans as (
        select r.id from spool.runs r
         where r.status = 'running' and r.executor_id in (select id from dead)
           and r.claim_epoch < 1000000000000000
         limit max_runs
           for update of r skip locked
    ), adopted as (
        update spool.runs r
           set status = 'queued',
               executor_id = null,
               incarnation = null,
               claim_epoch = r.claim_epoch + 1,
               attempt = greatest(r.attempt - (exists (
                             select 1 from spool.operation_outputs o
                              where o.run_id = r.id and o.claim_epoch = r.claim_epoch))::int, 0),
               updated_at = now()
          where r.id in (select id from orphans)
        returning r.id
    ), woke as (
        select pg_notify('spool_runs', '') where exists (select 1 from adopted)
    )
    select id from adopted, (select count(*) from woke) w;
$$;

comment on function spool.adopt_orphaned_runs(int) is 'Hands the runs of executors dead past their takeover delay back to the queue (new claim epoch); executors call it periodically.';

create or replace view spool.unrunnable_runs as
with live as (
    select e.id, e.workflows, e.queues from spool.executor_liveness e where e.alive
), stranded as (
    -- running runs whose owner is not alive: adopted at takeover_at, or they wait for it
    select r.*, l.takeover_at from spool.runs r
      left join spool.executor_liveness l on l.id = r.executor_id
     where r.status = 'running' and not exists (select 1 from live e where e.id = r.executor_id)
)
select r.id,
       r.workflow,
       r.queue,
       r.status,
       r.executor_id,
       case
           when r.attempt >= 1000000 or r.claim_epoch >= 1000000000000000
               then 'attempt or claim_epoch is at its limit (written by hand?); set it lower to let the run execute'
           when r.status = 'running' then
               'owner executor ' || r.executor_id || ' is not alive; '
               || coalesce('live executors adopt the run at ' || (select s.takeover_at from stranded s where s.id = r.id)::text,
                           'it resumes the run when it restarts (takeover disabled)')
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
    or (r.status in ('queued', 'running') and (r.attempt >= 1000000 or r.claim_epoch >= 1000000000000000))
    or (r.status = 'queued' and not exists (
            select 1 from live e
             where r.workflow = any (e.workflows)
               and (e.queues is null or r.queue = any (e.queues))))
    or (r.status = 'queued' and r.concurrency_key is not null and exists (
            select 1 from stranded s
             where s.queue = r.queue and s.concurrency_key = r.concurrency_key));
