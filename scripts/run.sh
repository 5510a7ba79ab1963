#!/usr/bin/env bash
# Runs proxy-pool: provisions PostgreSQL (see with-postgres.sh; the data
# persists between runs, under target/pgdata-run for a local cluster, in the
# volume of compose project proxy-pool-run with Docker), builds the release
# binary, migrates, and serves until SIGTERM or SIGINT, then exits with the
# service's status (0 after a graceful stop).
#
#   scripts/run.sh [--config PATH]
#
# The config is --config PATH, else $PROXY_POOL_CONFIG, else config.ini.
# PROXY_POOL_BIN names a proxy-pool binary to run instead of building
# target/release/proxy-pool.
set -euo pipefail

config=${PROXY_POOL_CONFIG:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || { echo "run.sh: --config needs a path" >&2; exit 2; }
      config=$2; shift 2 ;;
    --config=*) config=${1#--config=}; shift ;;
    *) echo "run.sh: unknown argument $1 (usage: scripts/run.sh [--config PATH])" >&2; exit 2 ;;
  esac
done
# Paths given by the caller are relative to the caller's directory, not the
# repository's.
if [ -n "$config" ]; then
  [ -f "$config" ] || { echo "run.sh: no config file at $config" >&2; exit 2; }
  config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
fi
bin=${PROXY_POOL_BIN:-}
if [ -n "$bin" ]; then
  case $bin in
    */*) ;;
    *) bin=$(command -v "$bin" || true) ;;
  esac
  [ -n "$bin" ] && [ -x "$bin" ] || {
    echo "run.sh: PROXY_POOL_BIN=${PROXY_POOL_BIN} is not an executable file" >&2
    exit 2
  }
  bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
fi

cd "$(dirname "$0")/.."
config=${config:-config.ini}
if [ -z "$bin" ]; then
  cargo build --release --locked --bin proxy-pool
  bin=target/release/proxy-pool
fi
exec scripts/with-postgres.sh --data target/pgdata-run --keep-data -- \
  bash -c '"$0" --config "$1" migrate && exec "$0" --config "$1" serve' "$bin" "$config"
