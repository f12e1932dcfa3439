#!/usr/bin/env bash
# Private PostgreSQL cluster for tests, demos and benchmarks.
#
#   scripts/pg.sh start DIR [PORT]  initdb (once) and start a cluster in DIR on a free port (or
#                             PORT: restart tests reuse it); prints the port on stdout
#   scripts/pg.sh stop DIR    stop it (immediate) and remove DIR
#   scripts/pg.sh kill DIR    stop it (immediate) and keep DIR (for restart tests)
#
# SPOOL_PG_SSL_DIR=DIR (with start): DIR holds server.crt and server.key; the cluster serves TLS
# with them (copied into its own directory, owned by its user, the key 0600 as PostgreSQL demands).
#
# It never touches a system cluster: the data directory, socket and log all live in DIR.
# PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
set -euo pipefail

cmd=${1:?usage: pg.sh start|stop|kill DIR}
dir=${2:?usage: pg.sh start|stop|kill DIR}
here=$(cd "$(dirname "$0")" && pwd)

find_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$found" ]; then echo "$found"; return; fi
  return 1
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_installed() {
  if find_bin initdb >/dev/null && find_bin pg_ctl >/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing PostgreSQL server packages..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-client >&2
    # Debian's package creates and starts a system cluster; we never use it.
  else
    echo "PostgreSQL server binaries not found. Install them with:" >&2
    echo "  sudo apt-get install -y postgresql postgresql-client" >&2
    exit 1
  fi
}

case "$cmd" in
start)
  ensure_installed
  initdb=$(find_bin initdb); pg_ctl=$(find_bin pg_ctl)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    # the postgres user must be able to reach the directory
    p=$dir; while [ "$p" != / ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done
    chown postgres "$dir"
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_owner "$initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  port=${3:-$(python3 "$here/free_port.py")}
  # Throwaway clusters skip durability for speed; SPOOL_PG_DURABLE=1 keeps it (crash tests that
  # stop the server with -m immediate and expect every commit back; benchmarks).
  durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  if [ "${SPOOL_PG_DURABLE:-0}" = 1 ]; then durability=""; fi
  ssl=""
  if [ -n "${SPOOL_PG_SSL_DIR:-}" ]; then
    owner=(); if [ "$(id -u)" = 0 ]; then owner=(-o postgres); fi
    install -m 0644 "${owner[@]}" "$SPOOL_PG_SSL_DIR/server.crt" "$dir/server.crt"
    install -m 0600 "${owner[@]}" "$SPOOL_PG_SSL_DIR/server.key" "$dir/server.key"
    ssl="-c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
  fi
  # SPOOL_PG_OPTIONS: more server settings, e.g. "-c shared_preload_libraries=pg_stat_statements"
  as_owner "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $durability -c max_connections=400 -c shared_buffers=256MB $ssl ${SPOOL_PG_OPTIONS:-}" \
    start >&2 || { cat "$dir/server.log" >&2; exit 1; }
  echo "$port" >"$dir/port"
  echo "$port"
  ;;
stop|kill)
  [ -d "$dir/data" ] || exit 0
  pg_ctl=$(find_bin pg_ctl)
  as_owner "$pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  if [ "$cmd" = stop ]; then rm -rf "$dir"; fi
  ;;
*)
  echo "usage: pg.sh start|stop|kill DIR" >&2; exit 2 ;;
esac
