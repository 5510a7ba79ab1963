#!/usr/bin/env bash
# Runs proxy-pool with config.ini: provisions PostgreSQL (see with-postgres.sh;
# the local cluster's data persists under target/pgdata-run between runs),
# builds the release binary, migrates, and serves until SIGINT/SIGTERM.
#   scripts/run.sh [extra proxy-pool arguments, e.g. --config other.ini]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin proxy-pool
exec scripts/with-postgres.sh --data target/pgdata-run --keep-data -- \
  bash -c 'target/release/proxy-pool "$@" migrate && exec target/release/proxy-pool "$@" serve' \
  proxy-pool --config "${PROXY_POOL_CONFIG:-config.ini}" "$@"
