-- V9: room on each page for a run's own updates.
--
-- A run row is written three times: inserted queued, updated when claimed, updated when it
-- finishes. With pages filled to the brim, each update found no room beside the old version, so
-- PostgreSQL put the new version on another page: it logged the whole new row (an update on the
-- same page logs only the bytes that changed), plus a lock record for the old row while it
-- looked for the other page. Filling new pages only half full at insert leaves room for the
-- updates, and pruning gives it back once old versions are no longer visible.
--
-- Measured with pg_walinspect on a 20,000-run no-op drain (see `just bench`): the drain's WAL
-- went from about 1,060 to about 820 bytes per run. The price is that pages of finished runs
-- are about half full, until retention deletes them.
--
-- Only pages written from now on are affected; existing rows are not moved.

alter table spool.runs set (fillfactor = 50);
