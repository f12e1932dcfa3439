-- V6: cancellation that reaches a running step, and a per-key policy for new runs.
--
-- 1. Setting cancel_requested on a running run notifies `spool_cancel` (payload: the run id), so
--    the executor running it learns at once and a step that can stop early (an LLM generation)
--    stops within milliseconds instead of at its next step boundary. Executors also look for
--    flagged runs among theirs periodically, in case a notification was missed.
-- 2. runs.key_policy says what an insert does when its concurrency key already has work:
--    'queue' (the default) waits its turn; 'replace' cancels the key's running run (as
--    spool.cancel_run does) and its queued runs enqueued before this one — "the user sent a new
--    message: stop the old answer".

create function spool.notify_cancel() returns trigger
language plpgsql as $$
begin
    perform pg_notify('spool_cancel', new.id);
    return null;
end $$;

create trigger runs_cancel_notify
    after update of cancel_requested on spool.runs
    for each row
    when (new.cancel_requested and not old.cancel_requested and new.status = 'running')
    execute function spool.notify_cancel();

alter table spool.runs
    add column key_policy text not null default 'queue'
        constraint runs_key_policy_known check (key_policy in ('queue', 'replace'));
comment on column spool.runs.key_policy is
    'On insert, when the concurrency key has work: queue (wait, the default) or replace (cancel the key''s running run and its earlier queued runs).';

create function spool.replace_key_work() returns trigger
language plpgsql as $$
begin
    update spool.runs
       set cancel_requested = true
     where queue = new.queue and concurrency_key = new.concurrency_key
       and status = 'running' and not cancel_requested and id <> new.id;
    update spool.runs
       set status = 'cancelled', finished_at = now(), executor_id = null,
           error = jsonb_build_object('code', 'replaced',
                                      'message', 'replaced by run ' || new.id || ' before it started')
     where queue = new.queue and concurrency_key = new.concurrency_key
       and status = 'queued' and enqueue_seq < new.enqueue_seq;
    return null;
end $$;

create trigger runs_replace_key_work
    after insert on spool.runs
    for each row
    when (new.key_policy = 'replace' and new.concurrency_key is not null)
    execute function spool.replace_key_work();
