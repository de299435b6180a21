#!/bin/bash
# Reproduces the deploy benchmark: installs gunicorn into a private venv under /tmp (once),
# builds the release binary if it is missing, then runs the driver (bounded: ~8 minutes).
# Extra arguments go to run.py (e.g. --only gunicorn,pm2 --duration 10).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${BENCH_VENV:-/tmp/bench-deploy-venv}
if [ ! -x "$VENV/bin/gunicorn" ]; then
  python3 -m venv "$VENV"
  timeout 300 "$VENV/bin/pip" install --quiet --disable-pip-version-check 'gunicorn>=22'
fi
[ -x "$REPO/target/release/hatchery" ] || (cd "$REPO" && timeout 1200 cargo build --release)
command -v pm2 >/dev/null || { echo "pm2 not found (npm install -g pm2)" >&2; exit 2; }
exec timeout --kill-after=30 1800 python3 "$HERE/run.py" --gunicorn "$VENV/bin/gunicorn" "$@"
