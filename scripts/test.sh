#!/usr/bin/env bash
# `just test`: start a private PostgreSQL under target/ (and make sure nats-server and the npm
# `eventsource` client, axe-core and Chromium are installed; the live-output tests start private nats-servers), migrate a
# template database, run the whole suite, clean up.
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
# the attach-protocol wire tests read live output with an SSE client nobody here wrote: the npm
# `eventsource` package (a WHATWG EventSource), pinned, installed under target/ (needs node >= 20)
SPOOL_TEST_SSE_CLIENTS="$PWD/$root/sse-clients"
eventsource_version=4.1.1
if { ! command -v node || ! command -v npm; } >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Node.js and npm (Debian packages) for the attach wire tests..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "node >= 20 and npm are needed for the attach wire tests (apt-get install nodejs npm)" >&2
  exit 1
fi
# the web view's accessibility is checked by axe-core (npm), injected into the page under test
axe_version=4.10.3
npm_version() { node -p "try { require('$SPOOL_TEST_SSE_CLIENTS/node_modules/$1/package.json').version } catch { '' }"; }
if [ "$(npm_version eventsource)" != "$eventsource_version" ] || [ "$(npm_version axe-core)" != "$axe_version" ]; then
  mkdir -p "$SPOOL_TEST_SSE_CLIENTS"
  npm install --silent --no-audit --no-fund --prefix "$SPOOL_TEST_SSE_CLIENTS" \
    "eventsource@$eventsource_version" "axe-core@$axe_version" >&2
fi
# the web view is tested in Debian's Chromium, headless (no browser download)
SPOOL_TEST_CHROMIUM=${SPOOL_TEST_CHROMIUM:-$(command -v chromium || true)}
if [ -z "$SPOOL_TEST_CHROMIUM" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Chromium (Debian package) for the web view tests..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2
  SPOOL_TEST_CHROMIUM=$(command -v chromium)
fi
if [ -z "$SPOOL_TEST_CHROMIUM" ]; then
  echo "Chromium is needed for the web view tests (apt-get install chromium)" >&2
  exit 1
fi
# the Kubernetes manifests are checked against the Kubernetes schemas by a validator from PyPI
# (tests/core/deploy.rs)
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate >&2
fi
# the OpenAPI document of the HTTP API is checked by a validator from PyPI (tests/core/openapi.rs)
if ! command -v openapi-spec-validator >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check openapi-spec-validator >&2
fi
# metrics and alert rules are checked by promtool (Debian's prometheus package)
SPOOL_TEST_PROMTOOL=${SPOOL_TEST_PROMTOOL:-$(command -v promtool || true)}
if [ -z "$SPOOL_TEST_PROMTOOL" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing promtool (Debian package prometheus) for the metrics tests..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
  SPOOL_TEST_PROMTOOL=$(command -v promtool)
fi
if [ -z "$SPOOL_TEST_PROMTOOL" ]; then
  echo "promtool is needed for the metrics tests (apt-get install prometheus)" >&2
  exit 1
fi
export SPOOL_TEST_PG="$base" SPOOL_TEST_TEMPLATE=spool_template SPOOL_TEST_NATS_SERVER SPOOL_TEST_SSE_CLIENTS SPOOL_TEST_CHROMIUM SPOOL_TEST_PROMTOOL
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast --test-threads 4 "$@"
else
  cargo test --no-fail-fast "$@" -- --test-threads 4
fi
