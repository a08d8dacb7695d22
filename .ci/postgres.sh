#!/usr/bin/env bash
# Install (Debian package) and start a throw-away PostgreSQL server on loopback for the
# multi-worker study test; prints the URL to use. Idempotent: reuses a running server.
set -euo pipefail
PORT=${HARNESS_PG_PORT:-54329}
DATA=${HARNESS_PG_DATA:-/tmp/harness-pg}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  else
    sudo apt-get update -qq >&2 && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  fi
fi
BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
# The server refuses to run as root: run it as the postgres system user the package created.
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
if ! as_pg "$BIN/pg_isready -q -h 127.0.0.1 -p $PORT"; then
  rm -rf "$DATA"; mkdir -p "$DATA"; [ "$(id -u)" = 0 ] && chown postgres "$DATA"
  as_pg "$BIN/initdb -D $DATA --auth=trust -U postgres" >/dev/null
  as_pg "$BIN/pg_ctl -D $DATA -l $DATA/server.log -w -o '-p $PORT -k /tmp -c listen_addresses=127.0.0.1' start" >&2
fi
as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -tc \"SELECT 1 FROM pg_database WHERE datname='harness_test'\"" | grep -q 1 \
  || as_pg "$BIN/psql -q -h 127.0.0.1 -p $PORT -U postgres -c 'CREATE DATABASE harness_test'" >&2
echo "postgresql://postgres@127.0.0.1:$PORT/harness_test"
