-- V11: a memoized step refers to its run through statement-level triggers, not a foreign key.
--
-- The foreign key from spool.operation_outputs to spool.runs checked each inserted step with a
-- query of its own (PostgreSQL runs a foreign key's check once per row, through SPI) and locked
-- the run again, and it deleted each deleted run's steps with another query per run. In a batch
-- of 512 recorded steps those checks took about a quarter of the statement's time. The
-- triggers below keep what the foreign key promised, once per statement:
--
-- - a step whose run does not exist is refused with the foreign key's error (SQLSTATE 23503,
--   constraint operation_outputs_run_fkey), on insert and on update;
-- - deleting or truncating runs deletes their steps;
-- - a run's id cannot change while steps refer to it.
--
-- One thing the foreign key did that these do not: lock the run until the step's transaction
-- ends. Spool's own writes lock it themselves (`for share`, the claim-epoch fence in
-- src/db/steps.rs), so the run cannot be deleted under them. A step inserted by hand in the
-- same instant as its run is deleted can outlive the run; it is never read, since a run's steps
-- are read by its id.

alter table spool.operation_outputs drop constraint operation_outputs_run_fkey;

create function spool.operation_outputs_check_runs() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    missing text;
begin
    select n.run_id into missing
      from new_steps n
     where not exists (select 1 from spool.runs r where r.id = n.run_id)
     limit 1;
    if found then
        raise exception 'insert or update on table "operation_outputs" violates foreign key constraint "operation_outputs_run_fkey"'
            using errcode = 'foreign_key_violation',
                  detail = format('Key (run_id)=(%s) is not present in table "runs".', missing),
                  schema = 'spool', table = 'operation_outputs',
                  constraint = 'operation_outputs_run_fkey';
    end if;
    return null;
end
$$;

comment on function spool.operation_outputs_check_runs() is
    'Refuses steps whose run does not exist (what the foreign key checked, once per statement).';

create trigger operation_outputs_inserted_check_runs
    after insert on spool.operation_outputs
    referencing new table as new_steps
    for each statement execute function spool.operation_outputs_check_runs();

create trigger operation_outputs_updated_check_runs
    after update on spool.operation_outputs
    referencing new table as new_steps
    for each statement execute function spool.operation_outputs_check_runs();

create function spool.runs_deleted_drop_steps() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    delete from spool.operation_outputs o using old_runs d where o.run_id = d.id;
    return null;
end
$$;

comment on function spool.runs_deleted_drop_steps() is
    'Deletes the steps of deleted runs (the foreign key''s on delete cascade, once per statement).';

create trigger runs_deleted_drop_steps
    after delete on spool.runs
    referencing old table as old_runs
    for each statement execute function spool.runs_deleted_drop_steps();

create function spool.runs_truncated_drop_steps() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    truncate spool.operation_outputs;
    return null;
end
$$;

create trigger runs_truncated_drop_steps
    after truncate on spool.runs
    for each statement execute function spool.runs_truncated_drop_steps();

create function spool.runs_id_changed_keep_steps() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
begin
    if exists (select 1 from spool.operation_outputs o where o.run_id = old.id) then
        raise exception 'update on table "runs" violates foreign key constraint "operation_outputs_run_fkey" on table "operation_outputs"'
            using errcode = 'foreign_key_violation',
                  detail = format('Key (id)=(%s) is still referenced from table "operation_outputs".', old.id),
                  schema = 'spool', table = 'runs',
                  constraint = 'operation_outputs_run_fkey';
    end if;
    return null;
end
$$;

create trigger runs_id_changed_keep_steps
    after update of id on spool.runs
    for each row when (old.id is distinct from new.id)
    execute function spool.runs_id_changed_keep_steps();
