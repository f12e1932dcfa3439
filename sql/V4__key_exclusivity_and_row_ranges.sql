-- Version 4: per-key exclusivity enforced by the database, claims that do not slow down behind
-- deep keys, rows the executor can always carry, and crash blame that spares innocent runs.
--
-- 1. One running run per (queue, concurrency key), by a unique index. Before this version the
--    claim's "no earlier unfinished run of the key" test was the only guard, and enqueue_seq is
--    fixed at insert, not at commit: a run inserted first but committed after a later run of its
--    key had started looked like the head of the key and started too. Now the database refuses a
--    second running run of a key whatever the snapshot, and the claim also skips keys that have a
--    running run.
--
--    What "enqueue order" means: per key, runs start in enqueue_seq order among the runs whose
--    insert has committed. A run whose insert commits after a later run of its key has started
--    cannot go back in time: it starts after that run ends (it is then the earliest queued run of
--    its key).
--
-- 2. key_ready: the claim walks only runnable rows. A keyed run waiting behind another run of its
--    key is not in the claim index, so a key with 100,000 queued runs costs a claim nothing.
--    A keyed run is inserted ready when its key has no unfinished run; when a keyed run leaves
--    queued/running (finishes, is cancelled, is deleted) the next queued run of its key becomes
--    ready. An insert that commits just as the last run of its key finishes can miss both; the
--    executors' periodic key sweep (spool.promote_waiting_keys) finds such keys. key_ready is
--    maintained by triggers and by Spool; an INSERT cannot set it.
--
-- 3. Ranges the code can carry, as named constraints: timestamps finite and within years
--    1-9999, attempt and claim_epoch far below their types' maxima (a claim adds one to both).
--    Existing rows outside them are clamped first (an infinite run_at means "as soon as possible"
--    or "never"; both ends stay in range).
--
-- 4. Crash blame. When an executor dies, the runs it was executing are taken back by its next
--    incarnation. An attempt is counted only against runs that could have caused the crash: the
--    runs on probation if the executor was isolating suspects (probation_runs), otherwise the
--    runs that recorded no step since their last claim.

alter table spool.runs add column key_ready boolean not null default true;

comment on column spool.runs.key_ready is 'Maintained by Spool: false while a keyed run waits behind another unfinished run of its (queue, concurrency_key); only ready runs are claimed.';

update spool.runs r
   set key_ready = false
 where r.status = 'queued' and r.concurrency_key is not null
   and exists (select 1 from spool.runs k
                where k.queue = r.queue and k.concurrency_key = r.concurrency_key
                  and k.status in ('queued', 'running')
                  and (k.status = 'running' or k.enqueue_seq < r.enqueue_seq));

-- The claim walks this index: only queued rows that are ready (a waiting keyed run is absent).
drop index spool.runs_claim_idx;
create index runs_claim_idx on spool.runs (priority, run_at, enqueue_seq)
    where status = 'queued' and key_ready;

-- The database's own guard: never two running runs of one (queue, concurrency key).
create unique index runs_one_running_per_key on spool.runs (queue, concurrency_key)
    where status = 'running' and concurrency_key is not null;

-- The claim's per-key check: the ready queued runs of a key (one, or a few after a race).
create index runs_key_head_idx on spool.runs (queue, concurrency_key, enqueue_seq)
    where status = 'queued' and key_ready and concurrency_key is not null;

-- The key sweep walks the distinct keys of waiting runs.
create index runs_key_waiting_idx on spool.runs (queue, concurrency_key, enqueue_seq)
    where status = 'queued' and not key_ready;

-- An inserted keyed run is ready when its key has no unfinished run; an unkeyed one always is.
create function spool.runs_set_key_ready() returns trigger
language plpgsql as $$
begin
    if new.concurrency_key is null then
        new.key_ready := true;
    else
        new.key_ready := not exists (
            select 1 from spool.runs k
             where k.queue = new.queue and k.concurrency_key = new.concurrency_key
               and k.status in ('queued', 'running'));
    end if;
    return new;
end;
$$;

create trigger runs_inserted_key_ready
    before insert on spool.runs
    for each row
    when (new.concurrency_key is not null or not new.key_ready)
    execute function spool.runs_set_key_ready();

-- When a keyed run leaves queued/running, the earliest queued run of its key becomes ready.
-- (A trigger's query sees rows committed since the statement began, as plpgsql statements
-- take their own snapshot.)
create function spool.runs_promote_next_of_key() returns trigger
language plpgsql as $$
begin
    update spool.runs r
       set key_ready = true
     where r.id = (select n.id from spool.runs n
                    where n.queue = old.queue and n.concurrency_key = old.concurrency_key
                      and n.status = 'queued'
                    order by n.enqueue_seq
                    limit 1)
       and not r.key_ready;
    return null;
end;
$$;

create trigger runs_left_key_promote_next
    after update of status on spool.runs
    for each row
    when (old.concurrency_key is not null
          and old.status in ('queued', 'running')
          and new.status not in ('queued', 'running'))
    execute function spool.runs_promote_next_of_key();

create trigger runs_deleted_promote_next
    after delete on spool.runs
    for each row
    when (old.concurrency_key is not null and old.status in ('queued', 'running'))
    execute function spool.runs_promote_next_of_key();

-- The key sweep: makes ready the earliest queued run of every key that has waiting runs but no
-- ready or running run (an insert that raced the end of its key's last run, or rows edited by
-- hand). Walks one index entry per distinct waiting key (a loose index scan), not every waiting
-- run. Returns how many runs it made ready.
create function spool.promote_waiting_keys() returns bigint
language sql as $$
    with recursive keys as (
        (select w.queue, w.concurrency_key from spool.runs w
          where w.status = 'queued' and not w.key_ready
          order by w.queue, w.concurrency_key limit 1)
        union all
        select n.queue, n.concurrency_key
          from keys k,
               lateral (select w.queue, w.concurrency_key from spool.runs w
                         where w.status = 'queued' and not w.key_ready
                           and (w.queue, w.concurrency_key) > (k.queue, k.concurrency_key)
                         order by w.queue, w.concurrency_key limit 1) n
    ), stuck as (
        select (select w.id from spool.runs w
                 where w.queue = k.queue and w.concurrency_key = k.concurrency_key
                   and w.status = 'queued'
                 order by w.enqueue_seq limit 1) as id
          from keys k
         where not exists (select 1 from spool.runs o
                            where o.queue = k.queue and o.concurrency_key = k.concurrency_key
                              and (o.status = 'running' or (o.status = 'queued' and o.key_ready)))
    ), promoted as (
        update spool.runs r set key_ready = true
          from stuck s
         where r.id = s.id and r.status = 'queued' and not r.key_ready
        returning 1
    )
    select count(*) from promoted;
$$;

comment on function spool.promote_waiting_keys() is 'Makes the head of every key with waiting runs but no ready or running run ready; executors run it periodically.';

-- cancel_run must not leave a key without a ready head: a cancelled queued run leaves the key
-- through the trigger above like any other terminal transition.

-- Ranges the executor can carry. Out-of-range rows are clamped first.
update spool.runs set run_at = greatest(least(run_at, '9999-12-31 00:00:00+00'), '0001-01-02 00:00:00+00')
 where not (run_at >= '0001-01-02 00:00:00+00' and run_at <= '9999-12-31 00:00:00+00');
update spool.runs set created_at = greatest(least(created_at, '9999-12-31 00:00:00+00'), '0001-01-02 00:00:00+00')
 where not (created_at >= '0001-01-02 00:00:00+00' and created_at <= '9999-12-31 00:00:00+00');
update spool.runs set updated_at = now()
 where not (updated_at >= '0001-01-02 00:00:00+00' and updated_at <= '9999-12-31 00:00:00+00');
update spool.runs set started_at = greatest(least(started_at, '9999-12-31 00:00:00+00'), '0001-01-02 00:00:00+00')
 where not (started_at >= '0001-01-02 00:00:00+00' and started_at <= '9999-12-31 00:00:00+00');
update spool.runs set finished_at = greatest(least(finished_at, '9999-12-31 00:00:00+00'), '0001-01-02 00:00:00+00')
 where not (finished_at >= '0001-01-02 00:00:00+00' and finished_at <= '9999-12-31 00:00:00+00');
update spool.runs set attempt = least(attempt, 1000000), claim_epoch = least(claim_epoch, 1000000000000000)
 where attempt > 1000000 or claim_epoch > 1000000000000000;

alter table spool.runs
    add constraint runs_times_in_range check (
        run_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00'
        and created_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00'
        and updated_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00'
        and (started_at is null or started_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00')
        and (finished_at is null or finished_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00')),
    add constraint runs_attempt_range check (attempt <= 1000000),
    add constraint runs_claim_epoch_range check (claim_epoch between 0 and 1000000000000000);

update spool.operation_outputs set started_at = greatest(least(started_at, '9999-12-31 00:00:00+00'), '0001-01-02 00:00:00+00')
 where not (started_at >= '0001-01-02 00:00:00+00' and started_at <= '9999-12-31 00:00:00+00');
update spool.operation_outputs set finished_at = greatest(least(finished_at, '9999-12-31 00:00:00+00'), '0001-01-02 00:00:00+00')
 where not (finished_at >= '0001-01-02 00:00:00+00' and finished_at <= '9999-12-31 00:00:00+00');
update spool.operation_outputs set chunks = array_remove(chunks, null) where array_position(chunks, null) is not null;

alter table spool.operation_outputs
    add constraint operation_outputs_times_in_range check (
        started_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00'
        and finished_at between '0001-01-02 00:00:00+00' and '9999-12-31 00:00:00+00'),
    add constraint operation_outputs_chunks_not_null check (array_position(chunks, null) is null);

-- Crash blame: which runs this executor is isolating right now, and in which incarnation.
alter table spool.executors
    add column probation_runs text[] not null default '{}',
    add column probation_incarnation bigint null;

comment on column spool.executors.probation_runs is 'Runs the executor is starting alone because they were in flight at repeated crashes; if it dies now, only these are blamed.';
comment on column spool.executors.probation_incarnation is 'The incarnation that set probation_runs.';

comment on column spool.runs.attempt is 'Claims counted against the run: a first claim counts, a re-claim after a crash counts only if the run could have caused it (it was on probation, or it recorded no step since its last claim); a release gives one back.';

-- Runs nobody can execute now also names rows at the attempt or claim_epoch limit (a claim adds
-- one to both, so such a row is never claimed) and keyed runs whose key has no ready head yet.
create or replace view spool.unrunnable_runs as
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
           when r.attempt >= 1000000 or r.claim_epoch >= 1000000000000000
               then 'attempt or claim_epoch is at its limit (written by hand?); set it lower to let the run execute'
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
    or (r.status in ('queued', 'running') and (r.attempt >= 1000000 or r.claim_epoch >= 1000000000000000))
    or (r.status = 'queued' and not exists (
            select 1 from live e
             where r.workflow = any (e.workflows)
               and (e.queues is null or r.queue = any (e.queues))))
    or (r.status = 'queued' and r.concurrency_key is not null and exists (
            select 1 from stranded s
             where s.queue = r.queue and s.concurrency_key = r.concurrency_key));
