-- V8: retention. Finished runs (and, by cascade, their steps) are deleted once they have been
-- finished longer than the retention: SPOOL_RETENTION for every queue (7 days by default), or a
-- queue's own row in spool.queue_retention. Executors delete in small batches, one statement per
-- batch, by whichever executor holds the `retention` maintenance lease; people at psql call
-- CALL spool.purge_finished('30 days'), which commits after every window.

create table spool.queue_retention (
    queue text not null,
    retention interval not null,
    constraint queue_retention_pkey primary key (queue),
    constraint queue_retention_queue_format check (queue ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    constraint queue_retention_positive check (retention > interval '0')
);

comment on table spool.queue_retention is
    'Per-queue retention of finished runs, overriding SPOOL_RETENTION; a long interval (''100 years'') keeps them.';

-- Periodic work that one executor at a time should do (retention, database metrics). A lease is
-- held while expires_at is in the future; its holder renews it, anyone takes an expired one.
create table spool.maintenance_leases (
    name text not null,
    holder text not null,
    expires_at timestamptz not null,
    constraint maintenance_leases_pkey primary key (name)
);

comment on table spool.maintenance_leases is
    'Who does periodic maintenance (retention, database metrics): one executor per lease name until expires_at.';

-- Retention walks the runs in enqueue order through the index every run already has
-- (runs_enqueue_seq_idx), a window at a time, remembering where it stopped: no index on
-- finished_at, which every finishing run would pay for in WAL.
--
-- One window: the `window_size` runs after `after_seq` in enqueue order; deletes those of them
-- finished longer ago than their queue's retention (the queue's row in spool.queue_retention,
-- else default_retention), skipping rows locked by anyone else. Returns how many it deleted, the
-- last enqueue_seq it looked at (null past the end) and that run's created_at (a walker stops
-- where runs are too young to have expired).
create function spool.purge_finished_window(default_retention interval, after_seq bigint, window_size int)
returns table (purged int, last_seq bigint, last_created_at timestamptz)
language sql as $$
    with win as (
        select r.id, r.enqueue_seq, r.queue, r.finished_at, r.created_at
          from spool.runs r
         where r.enqueue_seq > after_seq
         order by r.enqueue_seq
         limit window_size
    ), gone as (
        -- the ids as an array: the delete probes the primary key for each, whatever the
        -- planner guesses about how many there are
        delete from spool.runs r
         where r.id = any (array(
                   select x.id from spool.runs x
                    where x.id = any (array(select w.id from win w where w.finished_at is not null))
                      and x.finished_at < now() - coalesce((select q.retention from spool.queue_retention q
                                                             where q.queue = x.queue), default_retention)
                      for update skip locked))
        returning 1
    )
    select (select count(*)::int from gone),
           (select max(w.enqueue_seq) from win w),
           (select w.created_at from win w order by w.enqueue_seq desc limit 1);
$$;

comment on function spool.purge_finished_window(interval, bigint, int) is
    'One retention window: deletes the expired runs among the window_size runs after after_seq (enqueue order).';

-- For psql: CALL spool.purge_finished('30 days'); deletes every run finished longer ago than
-- older_than, whatever its queue, walking the table in windows of batch_size runs that each
-- commit (so no lock is held for long).
-- Cannot run inside a transaction block. Returns how many runs it deleted.
create procedure spool.purge_finished(older_than interval, batch_size int default 1000,
                                      inout purged bigint default 0)
language plpgsql as $$
declare
    cursor_seq bigint := 0;
    n int;
    last bigint;
begin
    purged := coalesce(purged, 0);
    loop
        select w.purged, w.last_seq into n, last
          from spool.purge_finished_window(older_than, cursor_seq, batch_size) w;
        purged := purged + n;
        commit;
        exit when last is null;
        cursor_seq := last;
    end loop;
end $$;
