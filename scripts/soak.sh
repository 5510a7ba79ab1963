#!/usr/bin/env bash
# Soak test (not run in CI): the release build against the proxy farm for a
# long time under steady client load, watching for leaks and slowdowns.
#
#   DURATION=30m scripts/soak.sh
#
# It provisions PostgreSQL (scripts/with-postgres.sh), starts `proxy-farm`
# with PROXIES simulated proxies (default 5000: half alive, 30% dead, 20% black
# holes), and `proxy-pool serve` fetching the farm's list every 10 s and
# validating every 5 s. wrk then sends get-proxy and feedback requests in
# turn (CONNECTIONS connections, default 8) for DURATION (default 30m; 90s, 3m,
# 1h also work). Every SAMPLE seconds (default 60) it prints the service's
# resident memory, open file descriptors and threads; every WINDOW seconds
# (default 300) the requests served, errors and latency percentiles of that
# window; at the end the first and last samples side by side and the totals.
# The service logs at RUST_LOG (default info without the per-request access
# lines). Needs: wrk, curl.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

to_seconds() {
  local value=$1
  case "$value" in
    *h) echo $(( ${value%h} * 3600 )) ;;
    *m) echo $(( ${value%m} * 60 )) ;;
    *s) echo "${value%s}" ;;
    *) echo "$value" ;;
  esac
}

if [ -z "${SOAK_INNER:-}" ]; then
  for tool in wrk curl; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is needed" >&2; exit 1; }
  done
  echo "soak: building the release binaries" >&2
  cargo build --release --workspace --bins --locked >&2
  export SOAK_INNER=1
  exec scripts/with-postgres.sh --data "${SOAK_PG_DATA:-$repo/target/pgdata-soak}" -- "$0" "$@"
fi

duration=$(to_seconds "${DURATION:-30m}")
window=$(to_seconds "${WINDOW:-300}")
sample_every=$(to_seconds "${SAMPLE:-60}")
proxies=${PROXIES:-5000}
connections=${CONNECTIONS:-8}
bin="${CARGO_TARGET_DIR:-$repo/target}/release"
work=$(mktemp -d "${TMPDIR:-/tmp}/soak.XXXXXX")

free_port() {
  local port
  for _ in $(seq 1 200); do
    port=$(( 15000 + RANDOM % 17000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

farm_port=$(free_port)
api_port=$(free_port)
"$bin/proxy-farm" --listen "127.0.0.1:$farm_port" --proxies "$proxies" >"$work/farm.out" 2>"$work/farm.log" &
pids+=($!)
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$farm_port/get" >/dev/null 2>&1 && break
  sleep 0.2
done

cat >"$work/config.ini" <<EOF
[database]
url = $DATABASE_URL
pool_size = 8
[server]
bind = 127.0.0.1:$api_port
workers = 8
[fetcher]
source_urls = http://127.0.0.1:$farm_port/lists/schemes
interval_seconds = 10
allow_private_addresses = true
[validator]
validation_target = http://127.0.0.1:$farm_port/get
https_target =
validation_timeout_ms = 2000
connect_timeout_ms = 1000
validation_workers = 100
revalidate_after_seconds = 60
retry_inactive_after_seconds = 60
[scheduler]
interval_seconds = 5
[state]
snapshot_path = $work/source_stats.bin
snapshot_interval_seconds = 60
sync_interval_seconds = 30
EOF

# The access log (one line per request) would write gigabytes at this rate.
RUST_LOG=${RUST_LOG:-info,access=warn} "$bin/proxy-pool" --config "$work/config.ini" serve 2>"$work/service.log" &
service=$!
pids+=("$service")
api="http://127.0.0.1:$api_port"
for _ in $(seq 1 600); do
  active=$(curl -fsS "$api/health" 2>/dev/null | sed -nE 's/.*"active_proxies":([0-9]+).*/\1/p' || true)
  [ -n "$active" ] && [ "$active" -gt 0 ] && break
  sleep 0.2
done
echo "soak: farm of $proxies proxies on :$farm_port, service pid $service on :$api_port, ${active:-0} active proxies"
echo "soak: $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), duration ${duration}s, windows ${window}s, $connections connections"

cat >"$work/load.lua" <<'EOF'
-- get-proxy, then feedback on the proxy it gave, for the source that asked.
-- One report in ten is a failure: with the default deltas (+1, -5) scores
-- then rise, as for a crawler whose proxies mostly work. A heavier failure
-- rate bans proxies faster than their cooldowns end, and the pool runs dry
-- for that source by design (503 all_banned), which this test would count
-- as errors.
local n = 0
local reports = 0
local last = nil
local last_source = nil
request = function()
  n = n + 1
  if last ~= nil then
    local proxy, source = last, last_source
    last = nil
    reports = reports + 1
    local success = (reports % 10 ~= 0) and "true" or "false"
    local body = '{"source":"' .. source .. '","proxy":"' .. proxy .. '","success":' .. success .. '}'
    return wrk.format("POST", "/feedback", { ["Content-Type"] = "application/json" }, body)
  end
  last_source = "soak" .. (n % 4)
  return wrk.format("GET", "/get-proxy?source=" .. last_source)
end
response = function(status, headers, body)
  if status == 200 then
    last = string.match(body, '"proxy":"([^"]+)"')
  end
end
EOF

sample() {
  local rss fds threads
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$service/status" 2>/dev/null || echo 0)
  fds=$(ls "/proc/$service/fd" 2>/dev/null | wc -l)
  threads=$(ls "/proc/$service/task" 2>/dev/null | wc -l)
  echo "$(date -u +%H:%M:%S) $((rss / 1024)) $fds $threads"
}
echo
printf '%-10s %8s %6s %8s\n' time rss_mib fds threads
(
  while kill -0 "$service" 2>/dev/null; do
    line=$(sample)
    echo "$line" >>"$work/samples"
    echo "$line" | awk '{printf "%-10s %8s %6s %8s\n", $1, $2, $3, $4}'
    sleep "$sample_every"
  done
) &
pids+=($!)

total_requests=0
total_errors=0
windows=()
started=$(date +%s)
index=0
while :; do
  left=$(( started + duration - $(date +%s) ))
  [ "$left" -le 0 ] && break
  length=$(( left < window ? left : window ))
  index=$((index + 1))
  wrk -t1 -c"$connections" -d"${length}s" --timeout 5s --latency -s "$work/load.lua" "$api" >"$work/wrk-$index.txt" 2>&1 || true
  requests=$(awk '/requests in/ {print $1}' "$work/wrk-$index.txt")
  non2xx=$(awk '/Non-2xx or 3xx responses/ {print $NF}' "$work/wrk-$index.txt")
  socket=$(awk -F'[ ,]+' '/Socket errors/ {print $4 + $6 + $8 + $10}' "$work/wrk-$index.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$work/wrk-$index.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$work/wrk-$index.txt")
  errors=$(( ${non2xx:-0} + ${socket:-0} ))
  total_requests=$(( total_requests + ${requests:-0} ))
  total_errors=$(( total_errors + errors ))
  windows+=("$(printf '%-7s %8s %10s %8s %10s %10s' "$index" "${length}s" "${requests:-0}" "$errors" "${p50:-?}" "${p99:-?}")")
  echo "soak: window $index (${length}s): ${requests:-0} requests, $errors errors, p50 ${p50:-?}, p99 ${p99:-?}"
done

sleep 1
final=$(sample)
echo "$final" >>"$work/samples"
stats=$(curl -fsS "$api/stats" 2>/dev/null || echo '{}')
kill -TERM "$service"
stop_started=$(date +%s%N)
set +e
wait "$service"
code=$?
set -e
stop_ms=$(( ($(date +%s%N) - stop_started) / 1000000 ))

echo
echo "== windows"
printf '%-7s %8s %10s %8s %10s %10s\n' window length requests errors p50 p99
printf '%s\n' "${windows[@]}"
echo
echo "== service figures (start, end)"
printf '%-10s %8s %6s %8s\n' time rss_mib fds threads
head -1 "$work/samples" | awk '{printf "%-10s %8s %6s %8s\n", $1, $2, $3, $4}'
tail -1 "$work/samples" | awk '{printf "%-10s %8s %6s %8s\n", $1, $2, $3, $4}'
echo
echo "== totals"
echo "requests served: $total_requests ($(( total_requests / (duration > 0 ? duration : 1) ))/s), errors: $total_errors"
echo "active proxies at the end: $(echo "$stats" | sed -nE 's/.*"active_proxies":([0-9]+).*/\1/p' | head -1)"
echo "validation cycles logged: $(grep -c 'validation cycle:' "$work/service.log" || true), fetches logged: $(grep -cE 'fetch .*(parsed|not modified)|: not modified' "$work/service.log" || true)"
echo "warnings and errors in the service log: $(grep -cE ' (WARN|ERROR) ' "$work/service.log" || true)"
echo "SIGTERM: exit code $code after ${stop_ms} ms"
echo "work directory (logs, wrk output): $work"
