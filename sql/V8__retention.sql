-- V8: retention. Finished runs (and, by cascade, their steps) are deleted once they have been
-- finished longer than the retention: SPOOL_RETENTION for every queue (7 days by default), or a
-- queue's own row in spool.queue_retention. Executors delete in small batches, one statement per
-- batch, by whichever executor holds the `retention` maintenance lease; people at psql call
-- spool.purge_finished('30 days'), which commits after every batch.

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

-- Finished runs by age: what retention walks, oldest first. Unfinished runs are not in it.
create index runs_finished_idx on spool.runs (finished_at) where finished_at is not null;

-- Deletes at most max_runs runs finished longer ago than their queue's retention (the queue's
-- row in spool.queue_retention, else default_retention), oldest first, skipping rows locked by
-- anyone else. Returns how many it deleted.
create function spool.purge_finished_batch(default_retention interval, max_runs int) returns int
language sql as $$
    -- the ids as an array: the delete then probes the primary key for each, whatever the
    -- planner guesses about how many there are
    with gone as (
        delete from spool.runs r
         where r.id = any (array(
                   select o.id from spool.runs o
                    where o.finished_at < now() - least(default_retention,
                                                        coalesce((select min(q.retention) from spool.queue_retention q),
                                                                 default_retention))
                      and o.finished_at < now() - coalesce((select q.retention from spool.queue_retention q
                                                             where q.queue = o.queue), default_retention)
                    order by o.finished_at
                    limit max_runs
                      for update skip locked))
        returning 1
    )
    select count(*)::int from gone;
$$;

comment on function spool.purge_finished_batch(interval, int) is
    'One retention batch: deletes at most max_runs finished runs older than their queue''s retention.';

-- For psql: CALL spool.purge_finished('30 days'); deletes every run finished longer ago than
-- older_than, whatever its queue, in batches that each commit (so no lock is held for long).
-- Cannot run inside a transaction block. Returns how many runs it deleted.
create procedure spool.purge_finished(older_than interval, batch_size int default 1000,
                                      inout purged bigint default 0)
language plpgsql as $$
declare
    n int;
begin
    purged := coalesce(purged, 0);
    loop
        with gone as (
            delete from spool.runs r
             where r.id = any (array(
                       select o.id from spool.runs o
                        where o.finished_at < now() - older_than
                        order by o.finished_at
                        limit batch_size
                          for update skip locked))
            returning 1
        )
        select count(*) into n from gone;
        purged := purged + n;
        commit;
        exit when n < batch_size;
    end loop;
end $$;
