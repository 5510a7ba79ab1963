#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, then the whole test suite
# against a real PostgreSQL (provisioned by with-postgres.sh and torn down).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo build --all-targets --locked

if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run --lib --bins --tests --locked --no-fail-fast)
else
  runner=(cargo test --lib --bins --tests --locked --no-fail-fast)
fi
scripts/with-postgres.sh --data target/pgdata-test -- "${runner[@]}" "$@"
# Doc tests are not run by nextest.
cargo test --doc --locked
