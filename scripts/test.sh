#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, then the whole test suite
# against a real PostgreSQL (provisioned by with-postgres.sh and torn down).
# The reliability tests start clusters of their own: with-postgres.sh
# --need-binaries installs the server binaries whichever database it uses.
# Exits non-zero on any failure. Arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
# Real proxy software for tests/real_proxies.rs (squid, tinyproxy, dante,
# microsocks), installed from Debian when missing; their services never run.
scripts/install-test-deps.sh

# The metronome's acceptance tests (tests/scheduler.rs) assert start times
# within 50 ms: they run on their own after the others, not beside tests that
# load both cores.
if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run --workspace --lib --bins --tests --locked --no-fail-fast -E 'not binary(scheduler)')
  timing=(cargo nextest run --locked --test scheduler)
else
  runner=(cargo test --workspace --lib --bins --locked --no-fail-fast)
  for file in tests/*.rs; do
    name=$(basename "$file" .rs)
    [ "$name" = scheduler ] || runner+=(--test "$name")
  done
  timing=(cargo test --locked --test scheduler)
fi
scripts/with-postgres.sh --need-binaries --data target/pgdata-test -- "${runner[@]}" "$@"
"${timing[@]}"
