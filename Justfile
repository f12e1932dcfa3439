# Spool's entry points. `just --list` explains every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes
default:
    @just --list

# Run the whole test suite against a private PostgreSQL it starts (and removes) itself
[positional-arguments]
test *args:
    scripts/test.sh "$@"

# Start Postgres and two executors, enqueue ticker runs, kill one executor mid-run, watch recovery
demo:
    scripts/demo.sh

# Formatting and lints, as CI runs them
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Start a private PostgreSQL under target/dev-pg and print its DATABASE_URL
dev-db:
    @port=$(scripts/pg.sh start target/dev-pg) && echo "export DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"

# Stop the private PostgreSQL started by dev-db
dev-db-stop:
    scripts/pg.sh stop target/dev-pg

# Chaos: runs across 3 executors hit by seeded faults (kinds: all, or a comma list of kill, black-hole-kill, freeze, partition-heal, scale-down, rolling-restart); prints the figures per kind
chaos runs="1000" faults="50" seed="1" kinds="all":
    CHAOS_RUNS={{runs}} CHAOS_FAULTS={{faults}} CHAOS_SEED={{seed}} CHAOS_KINDS={{kinds}} scripts/test.sh --test faults --run-ignored ignored-only --no-capture chaos_full

# Benchmarks: throughput, latency, live output, recovery and memory against the raw SQL ceiling; writes bench/results.md
bench:
    scripts/bench.sh

# Hand-inserted edge-value rows (seeded) mixed with normal runs: refused or documented, never a panic or a stall
hostile rows="20000" seed="1":
    SPOOL_HOSTILE_ROWS={{rows}} SPOOL_HOSTILE_SEED={{seed}} scripts/test.sh --test core --no-capture hostile_rows
