#!/usr/bin/env bash
# `just test`: start a private PostgreSQL under target/ (and make sure nats-server is installed;
# the live-output tests start private ones), migrate a template database, run the whole suite, clean up.
# Every test clones its own database from the template, so nothing leaks between tests.
set -euo pipefail
cd "$(dirname "$0")/.."
root=target/spool-test
mkdir -p "$root"

scripts/pg.sh stop "$root/pg" # a previous run that was killed may have left one behind
port=$(scripts/pg.sh start "$root/pg")
cleanup() { scripts/pg.sh stop "$root/pg"; }
trap cleanup EXIT

base="postgres://postgres@127.0.0.1:$port"
cargo build --quiet --bins --examples
psql -q -v ON_ERROR_STOP=1 "$base/postgres" -c "create database spool_template"
DATABASE_URL="$base/spool_template?sslmode=disable" target/debug/spool migrate >/dev/null

# live-output tests start private nats-servers of their own (they kill and restart them)
SPOOL_TEST_NATS_SERVER=$(scripts/nats.sh install)
export SPOOL_TEST_PG="$base" SPOOL_TEST_TEMPLATE=spool_template SPOOL_TEST_NATS_SERVER
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast --test-threads 4 "$@"
else
  cargo test --no-fail-fast "$@" -- --test-threads 4
fi
