-- V11: autovacuum keeps up with the queue.
--
-- Every run is inserted, updated twice and, after its retention, deleted; at thousands of runs
-- a second the dead versions pile up faster than autovacuum at its defaults removes them: it
-- starts once a fifth of the table is dead and then sleeps between pages (cost-based delay).
-- Since V9 leaves half of every page free for a run's own updates, the table has twice the
-- pages to visit. In the bench's retention soak (3 minutes, retention 2 s, ~7,500 runs/s) the
-- tables grew to 1.3–1.5× their size after the first minute instead of levelling off.
--
-- Here vacuum starts once 2% of the table is dead and runs without sleeping. A queue table is
-- small and hot, so a vacuum of it is short; operators can still override these per table.

alter table spool.runs set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

alter table spool.operation_outputs set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
