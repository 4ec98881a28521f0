#!/bin/sh
# Launch the gateway under AMD Solarflare Onload: host checks, then exec (same pid, so systemd
# keeps tracking it) of
#
#   onload --profile=PROFILE PYTHON -m gateway serve --transport onload --transport-profile PROFILE ARGS
#
# with GATEWAY_TRANSPORT_LAUNCHED=onload, so the gateway does not relaunch itself: it only
# verifies from inside that libonload is mapped and answers, and fails start-up if not.
#
# usage: launch-onload.sh [--dry-run] [--profile=NAME] [--env-file=FILE] [--python=PATH]
#                         [--wrapper=PATH] [--wait-driver=SECONDS] [gateway serve options...]
#
#   --dry-run        run the checks, print the exact argv and environment, exec nothing
#                    (exit 0, or 1 when a check failed)
#   --profile=NAME   Onload profile (default latency; also GATEWAY_ONLOAD_PROFILE)
#   --env-file=FILE  KEY=VALUE lines (EF_* overrides) exported before the wrapper runs, so they
#                    win over the profile. Under systemd use EnvironmentFile= instead.
#   --python=PATH    the gateway's interpreter (default /opt/gateway/venv/bin/python;
#                    also GATEWAY_PYTHON)
#   --wrapper=PATH   the onload wrapper (default: onload on PATH; also ONLOAD_WRAPPER)
#   --wait-driver=SECONDS
#                    wait up to SECONDS for the onload driver (/sys/module/onload and
#                    /dev/onload) before checking it, saying so once; for a driver that loads
#                    late in boot (default 0: check at once)
#
# API keys: in the config file's [[api_keys]] or --api-key-file FILE (a root-only file, e.g.
# a systemd credential: LoadCredential= and --api-key-file %d/NAME), never --api-key KEY: a
# key on a command line shows in ps. --dry-run prints --api-key values as ***.
#
# Checks (a failure stops the launch): the wrapper and interpreter exist; the onload driver is
# loaded (/sys/module/onload) and /dev/onload, /dev/onload_epoll exist -- skipped, like the
# wrapper's own check, with ONLOAD_DRIVERCHECK=false; the env file parses. Warnings: no huge
# pages reserved, a memlock limit (read from /proc/self/limits).
set -eu

dry_run=0
profile=${GATEWAY_ONLOAD_PROFILE:-latency}
env_file=
python=${GATEWAY_PYTHON:-/opt/gateway/venv/bin/python}
wrapper=${ONLOAD_WRAPPER:-onload}
wait_driver=0

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --profile=*) profile=${1#--profile=} ;;
    --env-file=*) env_file=${1#--env-file=} ;;
    --python=*) python=${1#--python=} ;;
    --wrapper=*) wrapper=${1#--wrapper=} ;;
    --wait-driver=*) wait_driver=${1#--wait-driver=} ;;
    *) break ;;  # the rest goes to `gateway serve`
  esac
  shift
done

failed=0
fail() {
  echo "launch-onload: FAIL: $*" >&2
  failed=1
}
warn() { echo "launch-onload: warning: $*" >&2; }
ok() { [ "$dry_run" = 0 ] || echo "launch-onload: ok: $*" >&2; }

if wrapper_path=$(command -v "$wrapper" 2>/dev/null); then
  ok "wrapper $wrapper_path"
else
  fail "the onload wrapper '$wrapper' is not on PATH (install Onload, or --wrapper=PATH)"
fi
if [ -x "$python" ]; then ok "python $python"; else fail "no executable interpreter at $python (--python=PATH)"; fi
case "$wait_driver" in
  '' | *[!0-9]*)
    echo "launch-onload: --wait-driver expects a whole number of seconds, got '$wait_driver'" >&2
    exit 2
    ;;
esac
driver_present() { [ -d /sys/module/onload ] && [ -c /dev/onload ] && [ -c /dev/onload_epoll ]; }
if [ "${ONLOAD_DRIVERCHECK:-true}" != false ] && [ "$wait_driver" -gt 0 ] && ! driver_present; then
  echo "launch-onload: waiting up to $wait_driver s for the onload driver (/sys/module/onload, /dev/onload, /dev/onload_epoll)" >&2
  waited=0
  while ! driver_present && [ "$waited" -lt "$wait_driver" ]; do
    sleep 1
    waited=$((waited + 1))
  done
  if driver_present; then ok "onload driver appeared after $waited s"; else fail "the onload driver did not load within $wait_driver s"; fi
fi
if [ "${ONLOAD_DRIVERCHECK:-true}" != false ]; then
  if [ -d /sys/module/onload ]; then ok "onload driver loaded"; else fail "the onload driver is not loaded (/sys/module/onload missing: modprobe onload, or onload_tool reload)"; fi
  for dev in /dev/onload /dev/onload_epoll; do
    if [ -c "$dev" ]; then ok "$dev"; else fail "$dev is missing (driver not loaded, or not passed into this container)"; fi
  done
fi
hugepages=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$hugepages" -gt 0 ]; then ok "vm.nr_hugepages=$hugepages"; else warn "no huge pages reserved (vm.nr_hugepages=0): Onload falls back to small pages unless EF_USE_HUGE_PAGES=2"; fi
# `ulimit -l` is not POSIX sh; the limits file is (awk inherits this shell's limits)
memlock=$(awk '/^Max locked memory/ { print $4 }' /proc/self/limits 2>/dev/null || true)
if [ "$memlock" = unlimited ]; then ok "memlock unlimited"; else warn "memlock limit is ${memlock:-unknown} bytes (LimitMEMLOCK=infinity in the unit)"; fi

for arg in "$@"; do
  case "$arg" in
    --api-key | --api-key=*)
      warn "--api-key puts the key on the command line (visible in ps): use --api-key-file FILE or the config file's [[api_keys]]"
      break
      ;;
  esac
done

if [ -n "$env_file" ]; then
  if [ ! -r "$env_file" ]; then
    fail "cannot read the environment file $env_file"
  else
    n=0
    while IFS= read -r line || [ -n "$line" ]; do
      n=$((n + 1))
      line=$(printf '%s' "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
      case "$line" in '' | '#'* | ';'*) continue ;; esac
      line=${line#export }
      key=${line%%=*}
      value=${line#*=}
      case "$key" in
        '' | [0-9]* | *[!A-Za-z0-9_]*) fail "$env_file:$n: expected KEY=VALUE"; continue ;;
      esac
      [ "$key" != "$line" ] || { fail "$env_file:$n: expected KEY=VALUE"; continue; }
      case "$value" in
        \"*\") value=${value#\"}; value=${value%\"} ;;
        \'*\') value=${value#\'}; value=${value%\'} ;;
      esac
      export "$key=$value"
    done <"$env_file"
  fi
fi

if [ "$failed" = 1 ] && [ "$dry_run" = 0 ]; then
  echo "launch-onload: not starting (see above; --dry-run shows the command)" >&2
  exit 1
fi

GATEWAY_TRANSPORT_LAUNCHED=onload
export GATEWAY_TRANSPORT_LAUNCHED
set -- "$wrapper" "--profile=$profile" "$python" -m gateway serve \
  --transport onload --transport-profile "$profile" "$@"

if [ "$dry_run" = 1 ]; then
  shown=
  i=0
  hide=0
  for arg in "$@"; do
    if [ "$hide" = 1 ]; then
      arg='***'
      hide=0
    else
      case "$arg" in
        --api-key) hide=1 ;;
        --api-key=*) arg='--api-key=***' ;;
      esac
    fi
    shown="$shown${shown:+ }$arg"
    echo "argv[$i]=$arg"
    i=$((i + 1))
  done
  echo "exec: $shown"
  env | grep -E '^(EF_|ONLOAD_|LD_PRELOAD=|GATEWAY_)' | sort | sed 's/^/env: /'
  echo "(plus the rest of the inherited environment)"
  if [ "$failed" = 1 ]; then
    echo "launch-onload: dry run: checks failed, a real launch would not start" >&2
    exit 1
  fi
  exit 0
fi
exec "$@"
