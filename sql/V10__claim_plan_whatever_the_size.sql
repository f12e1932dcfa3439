-- V10: the claim reads only the runs it claims, however large the queue was when it was planned.
--
-- An executor prepares its claim once and PostgreSQL may settle on a generic plan for it. An
-- idle executor's claims are planned while the queue is empty; the generic plan made then is
-- kept until the next ANALYZE of spool.runs, and it reached the claimed rows by a sequential
-- scan (a hash join against every row, or every row compared with every claimed tuple id). A
-- backlog inserted after an idle spell was then scanned whole on every claim: a fresh install's
-- first drain of 50,000 runs ran at about 3,000 runs/s instead of about 20,000, until autovacuum
-- analyzed the table.
--
-- The claim's update joins the claimed tuple ids through this function. It declares one row, so
-- every plan reaches each claimed row by its tuple id (a TID scan in a nested loop): one tuple id
-- costs less than any scan of the table, whatever its size is estimated at. It is PL/pgSQL so
-- that the planner cannot inline it and estimate the array's length instead.

create function spool.each_tid(tids tid[]) returns setof tid
language plpgsql immutable strict parallel safe rows 1 as $$
begin
    return query select unnest(tids);
end
$$;

comment on function spool.each_tid(tid[]) is
    'The tuple ids of an array, declared as one row so the claim''s plan reaches each by TID scan.';
