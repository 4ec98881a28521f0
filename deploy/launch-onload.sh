#!/bin/sh
# Launch the gateway under AMD Solarflare Onload: host checks, then exec (same pid, so systemd
# keeps tracking it) of
#
#   onload --profile=PROFILE PYTHON -m gateway serve --transport onload --transport-profile PROFILE ARGS
#
# A thin wrapper: the checks, the environment file and the exec are the gateway's own launcher
# (python -m gateway.transport.onload_launch, which documents them all), run with the
# gateway's interpreter. This script only finds that interpreter.
#
# usage: launch-onload.sh [--dry-run] [--profile=NAME] [--env-file=FILE] [--python=PATH]
#                         [--wrapper=PATH] [--wait-driver=SECONDS] [gateway serve options...]
#
#   --dry-run        run the checks, print the exact argv and environment, exec nothing
#   --python=PATH    the gateway's interpreter (default /opt/gateway/venv/bin/python;
#                    also GATEWAY_PYTHON)
#   --wait-driver=SECONDS
#                    wait up to SECONDS for a late onload driver before checking it
#
# API keys: in the config file's [[api_keys]] or --api-key-file FILE (a root-only file, e.g.
# a systemd credential: LoadCredential= and --api-key-file %d/NAME), never --api-key KEY: a
# key on a command line shows in ps. --dry-run prints --api-key values as ***.
set -eu

python=${GATEWAY_PYTHON:-/opt/gateway/venv/bin/python}
for arg in "$@"; do
  case "$arg" in
    --python=*) python=${arg#--python=} ;;
    --dry-run | --profile=* | --env-file=* | --wrapper=* | --wait-driver=*) ;;
    *) break ;; # the rest goes to `gateway serve`
  esac
done

if [ ! -x "$python" ]; then
  echo "launch-onload: FAIL: no executable interpreter at $python (--python=PATH)" >&2
  echo "launch-onload: not starting (see above; --dry-run shows the command)" >&2
  exit 1
fi
exec "$python" -m gateway.transport.onload_launch "$@"
