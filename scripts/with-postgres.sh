#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a PostgreSQL server, provisioning
# one when needed, and stops whatever it started when the command ends.
#
#   scripts/with-postgres.sh [--data DIR] [--keep-data] [--need-binaries] -- COMMAND [ARGS...]
#
# Where the database comes from, in order:
#   1. DATABASE_URL, when set: used as it is, nothing is started.
#   2. Docker, when `docker info` answers and the compose plugin is there
#      (`docker compose version`): the `postgres` service of the repository's
#      docker-compose.yml, on a free port of 127.0.0.1 (or PROXY_POOL_PG_PORT).
#      Throwaway use runs it as compose project `proxy-pool-test-PID`, removed with
#      its volume afterwards; --keep-data runs it as `proxy-pool-run`, whose
#      named volume keeps the data (a container of that project already
#      running is reused and left running).
#   3. A local cluster: initdb + pg_ctl on a free port of 127.0.0.1 with trust
#      authentication and its data under DIR (default target/pgdata); Debian's
#      postgresql package is installed with apt-get when its binaries are
#      missing. As root the cluster runs as the unprivileged `postgres` user
#      (initdb refuses root). The data directory is wiped first, and the
#      cluster runs without fsync (fast, and lost on a crash), unless
#      --keep-data is given: then the data persists and is written safely.
#
# --need-binaries makes sure the PostgreSQL server binaries are installed
# whatever the path (tests start clusters of their own), and exports their
# directory as PROXY_POOL_PG_BIN.
#
# COMMAND runs in the background: SIGTERM and SIGINT are passed on to it (as
# SIGTERM), and this script exits with its status once the database it
# started is stopped.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
data_dir="$repo/target/pgdata"
keep_data=0
need_binaries=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data_dir=$2; shift 2 ;;
    --keep-data) keep_data=1; shift ;;
    --need-binaries) need_binaries=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
# Absolute, so that the walk up its parents below ends at /.
mkdir -p "$(dirname "$data_dir")"
data_dir="$(cd "$(dirname "$data_dir")" && pwd)/$(basename "$data_dir")"
if [ $# -eq 0 ]; then
  echo "usage: $0 [--data DIR] [--keep-data] [--need-binaries] -- COMMAND [ARGS...]" >&2
  exit 2
fi

log() { echo "with-postgres: $*" >&2; }

cleanup_cmds=()
cleanup() {
  local status=$?
  for cmd in "${cleanup_cmds[@]:-}"; do
    [ -n "$cmd" ] && eval "$cmd" >/dev/null 2>&1 || true
  done
  exit "$status"
}
trap cleanup EXIT
# Until COMMAND runs, a signal ends the provisioning (and cleans up).
trap 'exit 130' INT
trap 'exit 143' TERM

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

find_pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then PG_BIN=$dir; fi
  done
  if [ -z "${PG_BIN:-}" ] && command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    PG_BIN=$(dirname "$(command -v initdb)")
  fi
  [ -n "${PG_BIN:-}" ]
}

# Sets and exports PG_BIN (as PROXY_POOL_PG_BIN), installing postgresql when needed.
ensure_pg_bin() {
  PG_BIN=""
  if ! find_pg_bin; then
    log "PostgreSQL binaries not found: installing Debian's postgresql package"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
    find_pg_bin || { log "no initdb/pg_ctl after installing postgresql"; exit 1; }
  fi
  export PROXY_POOL_PG_BIN="$PG_BIN"
}

free_port() {
  local port
  for _ in $(seq 1 200); do
    # Below Linux's ephemeral range (32768+), where outgoing connections
    # would make a port look free and yet be taken.
    port=$(( 15000 + RANDOM % 17000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

have_docker_compose() {
  command -v docker >/dev/null 2>&1 &&
    timeout 10 docker info >/dev/null 2>&1 &&
    timeout 10 docker compose version >/dev/null 2>&1
}

start_docker() {
  # A throwaway database is this run's own project, never shared with a
  # concurrent run; only the kept one (run.sh) is reused when running.
  local project="proxy-pool-test-$$" down="down -v"
  if [ "$keep_data" -eq 1 ]; then
    project=proxy-pool-run
    down="down"
  fi
  local compose=(docker compose -p "$project" -f "$repo/docker-compose.yml")
  local port=""
  if [ "$keep_data" -eq 1 ] &&
    [ -n "$("${compose[@]}" ps -q --status running postgres 2>/dev/null)" ]; then
    port=$("${compose[@]}" port postgres 5432 2>/dev/null | sed 's/.*://' || true)
  fi
  if [ -n "$port" ]; then
    log "reusing the running PostgreSQL of compose project $project"
  else
    port=${PROXY_POOL_PG_PORT:-}
    [ -n "$port" ] || port=$(free_port) || { log "no free port found"; exit 1; }
    log "starting PostgreSQL with docker compose (project $project, 127.0.0.1:$port)"
    PROXY_POOL_PG_PORT=$port "${compose[@]}" up -d --wait postgres >&2
    cleanup_cmds+=("$(printf '%q ' "${compose[@]}")$down")
  fi
  export DATABASE_URL="postgres://proxy_pool:proxy_pool@127.0.0.1:$port/proxy_pool"
}

start_local_cluster() {
  ensure_pg_bin
  local run_as=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    run_as=(runuser -u postgres --)
  fi
  if [ "$keep_data" -eq 0 ] || [ ! -f "$data_dir/PG_VERSION" ]; then
    rm -rf "$data_dir"
    mkdir -p "$data_dir"
    [ "${#run_as[@]}" -gt 0 ] && chown postgres: "$data_dir"
    log "initdb in $data_dir"
    local sync=()
    [ "$keep_data" -eq 0 ] && sync=(--no-sync)
    "${run_as[@]}" "$PG_BIN/initdb" -D "$data_dir" -U postgres --auth=trust -E UTF8 "${sync[@]}" >/dev/null
  fi
  # The parent directories must be traversable by the postgres user.
  if [ "${#run_as[@]}" -gt 0 ]; then
    local dir=$data_dir
    while [ "$dir" != "/" ]; do dir=$(dirname "$dir"); chmod o+x "$dir" 2>/dev/null || true; done
  fi
  # Durability costs time that a throwaway cluster does not need; kept data
  # must survive a crash.
  local durability=""
  [ "$keep_data" -eq 0 ] && durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  local port attempt started=0
  for attempt in 1 2 3 4 5; do
    port=$(free_port) || { log "no free port found"; exit 1; }
    log "starting a local cluster on 127.0.0.1:$port"
    if "${run_as[@]}" "$PG_BIN/pg_ctl" -D "$data_dir" -l "$data_dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$data_dir' -c max_connections=400 $durability" \
      start >/dev/null; then
      started=1
      break
    fi
    log "attempt $attempt failed (port taken?), retrying"
  done
  if [ "$started" -ne 1 ]; then
    log "PostgreSQL did not start; its log:"
    tail -20 "$data_dir/server.log" >&2
    exit 1
  fi
  cleanup_cmds+=("${run_as[*]} '$PG_BIN/pg_ctl' -D '$data_dir' -m fast -w stop")
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  export PROXY_POOL_PG_DATA="$data_dir"
}

if [ -n "${DATABASE_URL:-}" ]; then
  log "using DATABASE_URL from the environment"
elif have_docker_compose; then
  start_docker
else
  start_local_cluster
fi
[ "$need_binaries" -eq 1 ] && [ -z "${PROXY_POOL_PG_BIN:-}" ] && ensure_pg_bin
log "DATABASE_URL=$(echo "$DATABASE_URL" | sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#')"

# The command runs in a process group of its own (job control on while it
# starts), and both signals reach that whole group as SIGTERM, which
# proxy-pool takes as its cue to stop gracefully: a wrapper between this
# script and the real work (`bash -c`, cargo) no longer keeps it from the
# signal, and nothing outlives the database stopped below.
set -m
"$@" &
child=$!
set +m
trap 'kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true' TERM INT
# A trapped signal interrupts `wait`: wait again until the command has ended.
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true
done
status=0
wait "$child" || status=$?
exit "$status"
