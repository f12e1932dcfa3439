#!/usr/bin/env bash
# `just bench`: build release, start a private PostgreSQL (durable settings, so commits/s are
# honest) and a private nats-server under target/bench, run the bench (bench/main.rs), which
# prints one table and writes it with the machine's description to bench/results.md, and clean
# up everything on exit.
#
# Knobs (environment): BENCH_CONCURRENCY, BENCH_CLAIM_BATCH, BENCH_NOOP_RUNS, BENCH_ONLY=noop,steps,
# BENCH_DB_SETTINGS=plan_cache_mode=force_custom_plan (planner experiments without changing Spool)
# and the others listed by `target/release/examples/bench --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=target/bench

# the code under test: the commit, and whether the sources differ from it
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src sql Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  commit="$commit with uncommitted changes in src/, sql/ or Cargo.*"
fi
cargo build --release --bin spool --example bench

# one bench at a time: a second one would stop the first one's servers
exec 9>target/bench.lock
flock -n 9 || { echo "another 'just bench' is running (target/bench.lock)" >&2; exit 1; }

# a run that was killed may have left servers or spool processes behind
cleanup() {
  # spool processes the bench started (it keeps one pid file per process, removed when reaped)
  for f in "$root"/pids/*; do
    [ -e "$f" ] || continue
    pid=$(basename "$f")
    if grep -q spool "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "$f"
  done
  scripts/nats.sh stop "$root/nats" || true
  scripts/pg.sh stop "$root/pg" || true
}
cleanup
rm -rf "$root/logs"
mkdir -p "$root/bin"
trap cleanup EXIT
# the bench runs a copy, so a rebuild while it runs cannot swap the binary under test
cp target/release/spool "$root/bin/spool"

# 1,000 attachers hold a socket each in the bench and in spool
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# (servers and the bench do not inherit the lock: a leftover must not hold it)
pg_port=$(SPOOL_PG_DURABLE=1 scripts/pg.sh start "$root/pg" 9>&-)
nats_port=$(scripts/nats.sh start "$root/nats" 9>&-)

BENCH_PG="postgres://postgres@127.0.0.1:$pg_port" \
BENCH_NATS="nats://127.0.0.1:$nats_port" \
BENCH_SPOOL_BIN="$root/bin/spool" \
BENCH_WORK_DIR="$root" \
BENCH_OUT="${BENCH_OUT:-bench/results.md}" \
BENCH_COMMIT="$commit" \
  target/release/examples/bench "$@" 9>&- &
bench=$!
# on Ctrl-C or SIGTERM the bench stops its spool processes itself; then the EXIT trap runs
trap 'kill -TERM "$bench" 2>/dev/null || true' INT TERM
status=0
wait "$bench" || status=$?
if kill -0 "$bench" 2>/dev/null; then wait "$bench" || status=$?; fi
exit "$status"
