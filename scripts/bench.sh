#!/usr/bin/env bash
# Whole-service benchmarks, printed as tables with the machine, the commit and
# the command. Speed and memory targets are checked here, never in tests.
#   scripts/bench.sh            every benchmark
#   scripts/bench.sh ingest     one of: ingest validate api state scale_out learning
set -euo pipefail
cd "$(dirname "$0")/.."

all=(ingest validate api scale_out state learning)
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${all[@]}")

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"

cargo build --release --workspace --bins --benches --locked >&2

# The API benchmark drives the service with wrk (and skips without it), and
# compares it with nginx answering the same body (Debian's nginx-light, run
# from a temporary directory by the benchmark, never as the system service).
if [[ " ${selected[*]} " == *" api "* ]]; then
  missing=()
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian's ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    # policy-rc.d exit 101: the package must not start the system service.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
      $sudo chmod +x "$policy"
      trap '$sudo rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
  fi
fi

run() {
  local name=$1
  if [ ! -f "benches/$name.rs" ]; then
    echo "no benchmark named $name (have: $ALL_BENCHES)" >&2
    return 1
  fi
  echo
  echo "== $name: cargo bench --bench $name"
  if [ "$name" = state ]; then
    cargo bench --locked --bench state -- --warm-up-time 1 --measurement-time 3 2>&1 | grep -E "time:|^[a-z_/ ]+$" || true
  else
    # stderr carries the per-run lines and any "skipped" reason; cargo's own
    # build chatter is left out.
    cargo bench --locked --bench "$name" 2>&1 |
      grep -vE '^ *(Compiling|Finished|Running) |^warning: the following packages|^note: to see what the problems were'
    return "${PIPESTATUS[0]}"
  fi
}

export -f run
export ALL_BENCHES="${all[*]}"
scripts/with-postgres.sh --data target/pgdata-bench -- bash -c '
  for name in "$@"; do run "$name"; done
' bench "${selected[@]}"
