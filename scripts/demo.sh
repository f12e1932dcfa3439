#!/usr/bin/env bash
# `just demo`: Spool in about half a minute.
#
# Starts a private PostgreSQL and a private nats-server (under target/demo, never a system one)
# and two executors, enqueues `ticker` runs by SQL and by HTTP, shows them progressing through the
# psql views, attaches to the live output of one of spool-1's runs through spool-2's HTTP API,
# SIGKILLs spool-1 mid-run, restarts it under the same executor id and shows it replay its runs
# from the last memoized step, while the attacher sees a `reset` and then the whole output once.
# Then a late attach to the finished run, and a chat: two llm.chat answers of one conversation
# against the built-in mock provider, followed by one per-conversation attach while the answering
# executor is SIGKILLed mid-answer. Everything it started is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cargo curl python3; do # scripts/pg.sh installs PostgreSQL and psql when missing
  command -v "$tool" >/dev/null || { echo "demo needs $tool on PATH" >&2; exit 1; }
done

root=target/demo
bin=target/debug/spool
ticks=40
ticker_input="{\"count\": $ticks, \"interval_ms\": 250, \"steps\": 5}"
attach_log=$root/attach.log # the live attacher's stdout and stderr, each line prefixed
attach_prefix='  attach| '

# ---------------------------------------------------------------------------------------------
# output helpers
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
  bold=$'\e[1m' dim=$'\e[2m' red=$'\e[31m' reset=$'\e[0m'
else
  bold='' dim='' red='' reset=''
fi
started=$SECONDS
t0=$SECONDS
header() { printf '\n%s== %s ==%s\n' "$bold" "$*" "$reset"; }
say() { printf '%s\n' "$*"; }
show_cmd() { printf '%s$ %s%s\n' "$dim" "$*" "$reset"; }
# shellcheck disable=SC2016 # the command is printed, not run
show_sql() { printf '%s$ psql "$DATABASE_URL" <<'"'"'SQL'"'"'\n%s\nSQL%s\n' "$dim" "$1" "$reset"; }
die() {
  printf '%sdemo failed: %s%s\n' "$red" "$*" "$reset" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------------
# processes and cleanup
declare -A pid=()  # executor id -> pid of its `spool serve`
declare -A port=() # executor id -> HTTP port
attach_pipe=''     # pid of the background attacher pipeline (its last element)

stop_leftovers() {
  # a previous demo that was killed before its cleanup ran may have left executors, an attacher,
  # PostgreSQL and nats-server behind
  local f p
  for f in "$root"/spool-*.pid "$root/attach.pid" "$root/mock-llm.pid"; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -Eq "$bin (serve|attach|mock-llm)"; then
      kill -9 "$p" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  scripts/pg.sh stop "$root/pg"
  scripts/nats.sh stop "$root/nats"
}

stop_attacher() {
  [ -n "$attach_pipe" ] || return 0
  if [ -f "$root/attach.pid" ]; then
    kill -9 "$(cat "$root/attach.pid")" 2>/dev/null || true
  fi
  wait "$attach_pipe" 2>/dev/null || true
  attach_pipe=''
  rm -f "$root/attach.pid"
}

cleanup() {
  local rc=$? id
  trap - EXIT
  stop_attacher
  for id in "${!pid[@]}"; do
    {
      kill -9 "${pid[$id]}" || true
      wait "${pid[$id]}" || true
    } 2>/dev/null
    rm -f "$root/$id.pid"
  done
  scripts/pg.sh stop "$root/pg" || true
  scripts/nats.sh stop "$root/nats" || true
  if [ "$rc" != 0 ]; then
    say "executor logs are in $root/spool-*.log, the attacher's output in $attach_log" >&2
  fi
  exit "$rc"
}

mkdir -p "$root"
stop_leftovers
rm -f "$root"/spool-*.log "$attach_log" "$root"/attach.rc "$root"/late-attach.log "$root"/chat.log
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sql() { psql -X -q -v ON_ERROR_STOP=1 -P pager=off "$DATABASE_URL" "$@"; }
sql_value() { psql -X -q -v ON_ERROR_STOP=1 -P pager=off -At "$DATABASE_URL" -c "$1"; }

start_executor() {
  local id=$1
  say "starting $id: SPOOL_EXECUTOR_ID=$id SPOOL_LISTEN=127.0.0.1:${port[$id]} SPOOL_CONCURRENCY=2 spool serve"
  SPOOL_EXECUTOR_ID=$id SPOOL_LISTEN=127.0.0.1:${port[$id]} SPOOL_CONCURRENCY=2 RUST_LOG=info \
    NATS_URL=$NATS_URL SPOOL_LLM_BASE_URL=$LLM_BASE_URL "$bin" serve >>"$root/$id.log" 2>&1 &
  pid[$id]=$!
  echo "${pid[$id]}" >"$root/$id.pid"
}

# Waits (deadline 30 s) until the executor holds its id (spool.executor_liveness says alive) and
# its HTTP API answers.
wait_alive() {
  local id=$1 deadline=$((SECONDS + 30))
  until [ "$(sql_value "select alive from spool.executor_liveness where id = '$id'")" = t ] &&
    curl -sf -o /dev/null "http://127.0.0.1:${port[$id]}/healthz"; do
    kill -0 "${pid[$id]}" 2>/dev/null || { tail -n 20 "$root/$id.log" >&2; die "$id exited at startup"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$root/$id.log" >&2; die "$id not alive after 30 s"; }
    sleep 0.1
  done
}

progress_query="select id, status, executor_id, attempt, steps_done, last_step from spool.run_progress order by created_at, id"
liveness_query="select id, alive, running from spool.executor_liveness order by id"

# ---------------------------------------------------------------------------------------------
# the live attacher: `spool attach` in the background, stdout and stderr merged, every line
# prefixed, into $attach_log; its exit status goes to $root/attach.rc
attach_target=''
attach_shown=0 # lines of $attach_log already printed
reset_seen=''

prefix_lines() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do printf '%s%s\n' "$1" "$line"; done
}

start_attacher() {
  local url=$1
  : >"$attach_log"
  show_cmd "spool attach $attach_target --lines --url $url 2>&1 | sed 's/^/$attach_prefix/' >$attach_log &"
  (
    "$bin" attach "$attach_target" --lines --url "$url" 2>&1 &
    echo $! >"$root/attach.pid"
    rc=0
    wait $! || rc=$?
    echo "$rc" >"$root/attach.rc"
  ) 2>/dev/null | prefix_lines "$attach_prefix" >>"$attach_log" & # (no job notices from the subshell)
  attach_pipe=$!
}

# Prints the attacher's lines that arrived since the last call (complete lines only).
show_attach() {
  [ -n "$attach_target" ] || return 0
  local n new
  n=$(wc -l <"$attach_log")
  [ "$n" -gt "$attach_shown" ] || return 0
  new=$(sed -n "$((attach_shown + 1)),${n}p" "$attach_log")
  attach_shown=$n
  printf '%s\n' "$new"
  if [ -z "$reset_seen" ] && grep -qF '[reset: ' <<<"$new"; then
    reset_seen=1
    say "${bold}the attacher saw reset: spool-1's restart replays the run; steps memoized before the kill${reset}"
    say "${bold}republish their chunks from Postgres and the step in flight runs again, so the output${reset}"
    say "${bold}arrives whole, exactly once after the reset${reset}"
  fi
}

# An attach log's output lines: prefix removed, blank lines dropped (the CLI prints an empty line
# before a marker so that it starts a line of its own when chunks are not line-separated).
attach_output() { sed -e "s/^$2//" -e '/^$/d' "$1"; }
expected_output() {
  local i
  for ((i = 1; i <= ticks; i++)); do echo "tick-$i"; done
  echo "[done] {\"ticks\":$ticks}"
}

# One progress frame: the runs table, a one-line executor summary and the attacher's new lines.
frame() {
  printf '%s-- t+%ds%s\n' "$dim" "$((SECONDS - t0))" "$reset"
  sql -P footer=off -c "$progress_query"
  sql_value "select 'executors: ' || string_agg(id || case when alive then ' alive' else ' DOWN' end
                                                 || ' (' || running || ' running)', ', ' order by id)
               from spool.executor_liveness"
  show_attach
}

# ---------------------------------------------------------------------------------------------
header "1. Build, start PostgreSQL and NATS"
show_cmd "cargo build --bin spool"
cargo build --quiet --bin spool
show_cmd "scripts/pg.sh start $root/pg"
pgport=$(scripts/pg.sh start "$root/pg")
export DATABASE_URL="postgres://postgres@127.0.0.1:$pgport/postgres?sslmode=disable"
say "DATABASE_URL=$DATABASE_URL"
command -v psql >/dev/null || die "psql not found (apt-get install postgresql-client)"
show_cmd "spool migrate"
RUST_LOG=warn "$bin" migrate
show_cmd "scripts/nats.sh start $root/nats"
nats_port=$(scripts/nats.sh start "$root/nats")
export NATS_URL="nats://127.0.0.1:$nats_port"
say "NATS_URL=$NATS_URL   # live output: JetStream, one subject per run attempt"
llm_port=$(python3 scripts/free_port.py)
show_cmd "spool mock-llm --listen 127.0.0.1:$llm_port &   # an OpenAI-compatible mock provider"
"$bin" mock-llm --listen "127.0.0.1:$llm_port" >"$root/mock-llm.log" 2>&1 &
pid[mock-llm]=$!
echo "${pid[mock-llm]}" >"$root/mock-llm.pid"
export LLM_BASE_URL="http://127.0.0.1:$llm_port/v1"
say "SPOOL_LLM_BASE_URL=$LLM_BASE_URL   # for llm.chat (section 9)"

header "2. Start two executors"
say "Each executor has a stable id (like a StatefulSet pod name) and 2 worker slots; both publish"
say "live output to NATS_URL and serve attach (GET /v1/runs/{id}/stream) for any run."
port[spool-1]=$(python3 scripts/free_port.py)
port[spool-2]=$(python3 scripts/free_port.py)
while [ "${port[spool-2]}" = "${port[spool-1]}" ]; do port[spool-2]=$(python3 scripts/free_port.py); done
start_executor spool-1
start_executor spool-2
wait_alive spool-1
wait_alive spool-2
sql -c "$liveness_query"
say "The web view (runs, live output, conversations, executors) is at http://127.0.0.1:${port[spool-1]}/ while the demo runs."

header "3. Enqueue ticker runs"
t0=$SECONDS
say "ticker emits tick-1..tick-40, one every 250 ms, in 5 memoized steps (about 10 s per run)."
say "By SQL: a plain INSERT is an enqueue (id is optional and defaults to a UUID)."
insert_sql="INSERT INTO spool.runs (id, workflow, input) VALUES
  ('sql-1', 'ticker', '$ticker_input'),
  ('sql-2', 'ticker', '$ticker_input')
RETURNING id;"
show_sql "$insert_sql"
sql -At -c "$insert_sql"
say "Same concurrency key: these two run one at a time, in enqueue order."
keyed_sql="INSERT INTO spool.runs (id, workflow, input, concurrency_key) VALUES
  ('chat-42-a', 'ticker', '$ticker_input', 'chat-42'),
  ('chat-42-b', 'ticker', '$ticker_input', 'chat-42')
RETURNING id;"
show_sql "$keyed_sql"
sql -At -c "$keyed_sql"
say "By HTTP, through either executor's API:"
for n in 1 2; do
  id=spool-$n
  body="{\"id\":\"http-$n\",\"workflow\":\"ticker\",\"input\":$ticker_input}"
  show_cmd "curl -s -X POST http://127.0.0.1:${port[$id]}/v1/runs -H 'content-type: application/json' -d '$body'"
  response=$(curl -s -X POST "http://127.0.0.1:${port[$id]}/v1/runs" -H 'content-type: application/json' -d "$body")
  run_id=$(printf '%s' "$response" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' 2>/dev/null) ||
    die "enqueue over HTTP failed: $response"
  say "$run_id"
done

header "4. Watch progress"
say "Every second (run it yourself with psql and \\watch 1):"
say "  $progress_query"
say "  $liveness_query"
# until the runs spool-1 owns have finished a couple of steps
deadline=$((SECONDS + 30))
while :; do
  frame
  if [ -z "$attach_target" ]; then
    attach_target=$(sql_value "select id from spool.runs where executor_id = 'spool-1' and status = 'running'
                                order by started_at, id limit 1")
    if [ -n "$attach_target" ]; then
      say "${bold}Attach to $attach_target (run by spool-1) through spool-2's API: its lines show below each frame${reset}"
      start_attacher "http://127.0.0.1:${port[spool-2]}"
    fi
  fi
  done_steps=$(sql_value "select coalesce(min(steps_done), 0) from spool.run_progress
                           where executor_id = 'spool-1' and status = 'running'")
  [ "$done_steps" -ge 2 ] && break
  [ "$SECONDS" -lt "$deadline" ] || die "spool-1's runs did not reach 2 steps within 30 s"
  sleep 1
done
killed_runs=$(sql_value "select string_agg(id, ' ' order by id) from spool.runs
                          where executor_id = 'spool-1' and status = 'running'")
case " $killed_runs " in
*" $attach_target "*) ;;
*) die "the attach target $attach_target is no longer running on spool-1 (spool-1 runs: $killed_runs)" ;;
esac

header "5. Crash"
show_cmd "kill -9 ${pid[spool-1]}   # spool-1"
# (grouped so that bash's "Killed" job notice goes to /dev/null too)
{
  kill -9 "${pid[spool-1]}"
  wait "${pid[spool-1]}" || true
} 2>/dev/null
unset 'pid[spool-1]'
rm -f "$root/spool-1.pid"
say "${bold}SIGKILL spool-1 mid-run: its runs stay owned by spool-1 (status running)${reset}"
say "(runs $killed_runs; spool-2 does not take them: only spool-1 resumes what spool-1 owned)"
say "The attacher stays connected to spool-2 and waits: no output comes while $attach_target stands still."
deadline=$((SECONDS + 30))
until [ "$(sql_value "select alive from spool.executor_liveness where id = 'spool-1'")" = f ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "spool-1 still shown alive 30 s after SIGKILL"
  sleep 0.1
done
show_cmd "psql -c \"$liveness_query\""
sql -c "$liveness_query"
show_cmd "psql -c \"select id, status, executor_id, reason from spool.unrunnable_runs\""
sql -c "select id, status, executor_id, reason from spool.unrunnable_runs order by created_at"
[ "$(sql_value "select count(*) from spool.unrunnable_runs where executor_id = 'spool-1'")" -ge 1 ] ||
  die "spool.unrunnable_runs does not list spool-1's runs"
say "Meanwhile spool-2 carries on; spool-1's runs stand still:"
for _ in 1 2 3 4; do
  sleep 1
  frame
done

header "6. Restart spool-1"
printf '\n--- restarted (same executor id) ---\n' >>"$root/spool-1.log"
start_executor spool-1
wait_alive spool-1
say "${bold}restarted spool-1: it recovers its runs and replays them from the last memoized step${reset}"
deadline=$((SECONDS + 90))
while :; do
  sleep 1
  frame
  left=$(sql_value "select count(*) from spool.runs where status in ('queued', 'running')")
  [ "$left" = 0 ] && break
  [ "$SECONDS" -lt "$deadline" ] || die "$left runs still unfinished 90 s after the restart"
done
# the attacher ends with the run's end event
deadline=$((SECONDS + 15))
while kill -0 "$attach_pipe" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || { show_attach; die "the attacher did not end 15 s after its run finished"; }
  sleep 0.1
done
wait "$attach_pipe" || true
attach_pipe=''
rm -f "$root/attach.pid"
show_attach

header "7. Summary"
sql -c "select r.id, r.status, r.executor_id, r.attempt, r.claim_epoch, count(o.step) as memoized_steps, r.output
          from spool.runs r left join spool.operation_outputs o on o.run_id = r.id
         group by r.id order by r.created_at, r.id"
first_killed=${killed_runs%% *}
say "Steps of $first_killed: the steps memoized before the kill were not run again (their claim"
say "epoch is the first claim's); the step in flight at the kill ran again under claim epoch 2."
say "(attempt stays 1: a run that recorded steps before a crash did not cause it, so the crash is"
say "not charged to its max_attempts.)"
show_cmd "psql -c \"select step, name, claim_epoch, output, finished_at from spool.operation_outputs where run_id = '$first_killed' order by step\""
sql -c "select step, name, claim_epoch, output, to_char(finished_at, 'HH24:MI:SS.MS') as finished_at
          from spool.operation_outputs where run_id = '$first_killed' order by step"
show_cmd "curl -s http://127.0.0.1:${port[spool-2]}/v1/runs/$first_killed"
curl -s "http://127.0.0.1:${port[spool-2]}/v1/runs/$first_killed"
echo

# the demo checks what it claims
bad=$(sql_value "select string_agg(id || ' ' || status, ', ') from spool.runs where status <> 'succeeded'")
[ -z "$bad" ] || die "runs that did not succeed: $bad"
for id in $killed_runs; do
  epoch=$(sql_value "select claim_epoch from spool.runs where id = '$id'")
  [ "$epoch" = 2 ] || die "run $id was killed once and replayed but shows claim epoch $epoch"
done
in_order=$(sql_value "select b.started_at >= a.finished_at from spool.runs a, spool.runs b
                       where a.id = 'chat-42-a' and b.id = 'chat-42-b'")
[ "$in_order" = t ] || die "chat-42-b started before chat-42-a finished"
say "Per-key order: chat-42-b (key chat-42) started only after chat-42-a finished."

attach_rc=$(cat "$root/attach.rc" 2>/dev/null || echo missing)
rm -f "$root/attach.rc"
[ "$attach_rc" = 0 ] || die "the attacher of $attach_target exited with status $attach_rc (see $attach_log)"
resets=$(grep -cF "${attach_prefix}[reset: " "$attach_log" || true)
[ "$resets" = 1 ] || die "the attacher saw $resets resets (expected exactly 1; see $attach_log)"
before_reset=$(attach_output "$attach_log" "$attach_prefix" | sed -n '/^\[reset: /q;p')
after_reset=$(attach_output "$attach_log" "$attach_prefix" | sed -n '/^\[reset: /,$p' | tail -n +2)
[ "$after_reset" = "$(expected_output)" ] ||
  die "after the reset the attacher did not get exactly tick-1..tick-$ticks then done (see $attach_log)"
[ "$before_reset" = "$(expected_output | head -n "$(grep -c . <<<"$before_reset")")" ] ||
  die "before the reset the attacher did not get tick-1..tick-k in order (see $attach_log)"
say "Live attach: $(grep -c . <<<"$before_reset") ticks before the crash, one reset, then tick-1..tick-$ticks exactly once and"
say "done; the attacher exited 0 (its output: $attach_log)."

header "8. Late attach"
say "Attaching after the end replays the whole output once, from the start (either executor's API):"
late_url="http://127.0.0.1:${port[spool-1]}"
show_cmd "spool attach $attach_target --lines --url $late_url"
late_rc=0
with_timeout=()
command -v timeout >/dev/null && with_timeout=(timeout 30)
"${with_timeout[@]}" "$bin" attach "$attach_target" --lines --url "$late_url" >"$root/late-attach.log" 2>&1 || late_rc=$?
prefix_lines '  late| ' <"$root/late-attach.log"
[ "$late_rc" = 0 ] || die "the late attach exited with status $late_rc"
late=$(attach_output "$root/late-attach.log" '')
if grep -qF '[reset: ' <<<"$late"; then die "the late attach saw a reset"; fi
[ "$late" = "$(expected_output)" ] || die "the late attach did not print exactly tick-1..tick-$ticks then done"
say "Late attach: tick-1..tick-$ticks exactly once, then done; no reset."

header "9. Chat: an LLM conversation, attached per conversation"
say "llm.chat runs are LLM replies: input in the OpenAI Chat Completions shape, the reply streamed"
say "as chunks and memoized as one step. Here against the mock provider; for a real one, set"
say "SPOOL_LLM_BASE_URL=https://api.openai.com/v1 and SPOOL_LLM_API_KEY (any OpenAI-compatible server)."
say "Two messages of one conversation (concurrency key conv-7): the second answer waits for the first."
chat_sql="INSERT INTO spool.runs (id, workflow, concurrency_key, input) VALUES
  ('answer-1', 'llm.chat', 'conv-7', '{\"model\": \"mock:tokens=100,delay_ms=40\", \"messages\": [{\"role\": \"user\", \"content\": \"Tell me a long story\"}]}'),
  ('answer-2', 'llm.chat', 'conv-7', '{\"model\": \"mock:tokens=30,delay_ms=40\", \"messages\": [{\"role\": \"user\", \"content\": \"And a short one\"}]}')
RETURNING id;"
show_sql "$chat_sql"
sql -At -c "$chat_sql"
deadline=$((SECONDS + 30))
until owner=$(sql_value "select executor_id from spool.runs where id = 'answer-1' and status = 'running'") && [ -n "$owner" ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "answer-1 did not start"
  sleep 0.1
done
other=spool-1
[ "$owner" = spool-1 ] && other=spool-2
say "answer-1 is generating on $owner; a browser tab attaches to the conversation through $other:"
show_cmd "curl -sN http://127.0.0.1:${port[$other]}/v1/keys/conv-7/stream"
curl -sN "http://127.0.0.1:${port[$other]}/v1/keys/conv-7/stream" >"$root/chat.log" 2>&1 &
chat_curl=$!
deadline=$((SECONDS + 30))
until [ "$(grep -c '^event: chunk' "$root/chat.log" || true)" -ge 4 ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "no chat chunks arrived (see $root/chat.log)"
  sleep 0.1
done
show_cmd "kill -KILL ${pid[$owner]}   # $owner dies mid-answer"
kill -9 "${pid[$owner]}"
wait "${pid[$owner]}" 2>/dev/null || true
start_executor "$owner"
wait_alive "$owner"
deadline=$((SECONDS + 60))
until [ "$(grep -c '^event: done' "$root/chat.log" || true)" -ge 2 ]; do
  [ "$SECONDS" -lt "$deadline" ] || die "the conversation did not end (see $root/chat.log)"
  sleep 0.1
done
kill "$chat_curl" 2>/dev/null || true
wait "$chat_curl" 2>/dev/null || true
say "What the tab received, rendered (a reset clears the answer being shown):"
python3 - "$root/chat.log" <<'PY' || die "the conversation did not arrive whole, once (see $root/chat.log)"
import json, sys
events, cur = [], {}
for line in open(sys.argv[1]).read().splitlines() + [""]:
    if not line:
        if cur: events.append(cur)
        cur = {}
    elif not line.startswith(":"):
        k, _, v = line.partition(":")
        cur[k] = v[1:] if v.startswith(" ") else v
answers, resets = [], {}
for e in events:
    kind, data = e.get("event"), json.loads(e.get("data", "null"))
    if kind == "run":
        answers.append([data["run_id"], ""])
    elif kind == "reset":
        answers[-1][1] = ""
        resets[answers[-1][0]] = resets.get(answers[-1][0], 0) + 1
    elif kind == "chunk":
        answers[-1][1] += data
for run, text in answers:
    words = text.split()
    print(f"  {run}: {' '.join(words[:6])} ... {' '.join(words[-3:])}  ({len(words)} tokens, {resets.get(run, 0)} reset)")
expected = {"answer-1": "".join(f"t{i} " for i in range(1, 101)), "answer-2": "".join(f"t{i} " for i in range(1, 31))}
assert [r for r, _ in answers] == ["answer-1", "answer-2"], answers
assert all(text == expected[run] for run, text in answers), "an answer is not whole"
assert resets.get("answer-1") == 1, resets
PY
say "answer-1 was cut by the crash: the tab got one reset, then the whole answer once; answer-2"
say "followed on the same stream. Outputs (the assistant messages):"
sql -c "select id, status, executor_id, claim_epoch, left(output->>'content', 40) as reply
          from spool.runs where workflow = 'llm.chat' order by id"

header "10. Shut down"
show_cmd "kill -TERM ${pid[spool-1]} ${pid[spool-2]}   # spool-1, spool-2: they drain and exit"
for id in spool-1 spool-2; do kill -TERM "${pid[$id]}"; done
for id in spool-1 spool-2; do
  deadline=$((SECONDS + 30))
  while kill -0 "${pid[$id]}" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || die "$id still running 30 s after SIGTERM"
    sleep 0.1
  done
  rc=0
  wait "${pid[$id]}" || rc=$?
  unset "pid[$id]"
  rm -f "$root/$id.pid"
  say "$id exited with status $rc"
  [ "$rc" = 0 ] || die "$id did not exit cleanly (see $root/$id.log)"
done
say "all ${bold}$(sql_value "select count(*) from spool.runs")${reset} runs succeeded; logs: $root/spool-1.log, $root/spool-2.log, $attach_log"
say "demo finished in $((SECONDS - started)) s"
