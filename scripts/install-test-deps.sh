#!/usr/bin/env bash
# Installs the real proxy software that tests/real_proxies.rs runs: Debian's
# squid, tinyproxy, dante-server (danted) and microsocks, each only when its
# binary is missing. The packages' system services are never started: while
# apt-get runs, /usr/sbin/policy-rc.d answers 101 ("action forbidden") to
# every invoke-rc.d (an existing policy-rc.d is left as it is), and any
# service a package still started is stopped afterwards. The tests start each
# proxy as a process of their own with a config they write.
#
# A package that cannot be installed (no apt-get, no network, not root and no
# sudo) is reported and skipped: the tests that need it skip with that reason,
# or fail under CI=true. Exits non-zero only when a package was wanted and
# could not be installed under CI=true.
set -uo pipefail

log() { echo "install-test-deps: $*" >&2; }

# binary:package
wanted=(squid:squid tinyproxy:tinyproxy danted:dante-server microsocks:microsocks)
missing=()
for pair in "${wanted[@]}"; do
  binary=${pair%%:*}
  package=${pair#*:}
  if ! command -v "$binary" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$binary" ] && [ ! -x "/usr/bin/$binary" ]; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    log "not root and no sudo: cannot install ${missing[*]} (their tests skip)"
    [ "${CI:-}" = true ] && exit 1
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get: cannot install ${missing[*]} (their tests skip)"
  [ "${CI:-}" = true ] && exit 1
  exit 0
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# Written by install-test-deps.sh while it installs: no service starts.\nexit 101\n' |
    $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy" && own_policy=1
fi
restore_policy() { [ "$own_policy" -eq 1 ] && $sudo rm -f "$policy"; }
trap restore_policy EXIT

log "installing ${missing[*]} from Debian (services not started)"
status=0
# shellcheck disable=SC2206 # $sudo is empty or "sudo -n"
apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
if ! "${apt[@]}" update -qq >&2; then
  log "apt-get update failed"
  status=1
fi
if [ "$status" -eq 0 ]; then
  if ! "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2; then
    # One by one, so that one unavailable package does not cost the others.
    status=0
    for package in "${missing[@]}"; do
      if ! "${apt[@]}" install -y -qq --no-install-recommends "$package" >&2; then
        log "cannot install $package (its tests skip)"
        status=1
      fi
    done
  fi
fi

# A package whose maintainer script ignored policy-rc.d may still have
# started its daemon: stop it (the tests' own processes are started later).
for service in squid tinyproxy danted microsocks; do
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$service" ]; then
    $sudo "/etc/init.d/$service" stop >/dev/null 2>&1 || true
  fi
done

if [ "$status" -ne 0 ] && [ "${CI:-}" = true ]; then
  exit 1
fi
exit 0
