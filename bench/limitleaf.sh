#!/bin/bash
# Adapter "limitleaf" for ../shared/bench/bench.py: the harness's `limit` (limitsup) with each
# worker born in a cgroup leaf of its own, a new one for each start (bench/limitleaf.c): the
# floor for a supervisor that keeps every worker in its own leaf, as Hatchery does. Needs
# root and a cgroup2 mount. Built on first use into target/bench/limitleaf.
set -eu
HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=$HERE/target/bench/limitleaf
if [ ! -x "$BIN" ] || [ "$HERE/bench/limitleaf.c" -nt "$BIN" ]; then
  mkdir -p "$HERE/target/bench"
  cc -O2 -Wall -o "$BIN" "$HERE/bench/limitleaf.c"
fi
act=$1; shift
case $act in
  version)  echo "limitleaf (bench/limitleaf.c, $(cc --version | head -1))" ;;
  settings) echo "limitsup plus one cgroup leaf per start (mkdir + clone3 CLONE_INTO_CGROUP), old leaves removed when nothing is left to reap; stop = SIGTERM to limitleaf (TERMs all children, reaps, exits)" ;;
  config)   d=$1; n=$2; shift 2; printf '%s\n' "$n" "$@" > "$d/argv" ;;
  start)    mapfile -t a < "$1/argv"
            cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
            exec "$BIN" "$cg/limitleaf-bench.$$" "${a[@]}" ;;
  stop)     exec kill -TERM "$PB_START_PID" ;;
  teardown) kill -TERM "$PB_START_PID" 2>/dev/null || true ;;
esac
