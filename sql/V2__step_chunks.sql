-- Version 2: each memoized step keeps the chunks it emitted.
--
-- A new attempt purges the run's live-output subject before its first chunk, which also removes
-- the chunks of steps memoized by earlier attempts. Replay republishes them from here, so a late
-- attacher still sees the whole output exactly once.

alter table spool.operation_outputs
    add column chunks text[] not null default '{}';

comment on column spool.operation_outputs.chunks is 'Live-output chunks the step emitted, in order; republished when the step is replayed.';
