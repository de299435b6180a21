#!/bin/bash
# Adapter "hatchery" for ../shared/bench/bench.py (see its docstring for the contract):
# one site with N workers running CMD, the agent in the foreground.
# Uses $HATCHERY_BIN, by default the packaged build next to this file (target/dist/hatchery,
# `cargo build --profile dist`), or target/release/hatchery when there is none.
set -eu
# The project: the directory above this file's, found without a fork (the harness times
# `stop` from the adapter's spawn, and `limit`'s adapter forks nothing before its `kill`).
case $0 in */*) HERE=${0%/*}/.. ;; *) HERE=.. ;; esac
default=$HERE/target/dist/hatchery
[ -x "$default" ] || default=$HERE/target/release/hatchery
BIN=${HATCHERY_BIN:-$default}
act=$1; shift
case $act in
  version)  echo "hatchery $("$BIN" --version | cut -d' ' -f2) ($(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)), reactor ${HATCHERY_REACTOR:-io_uring}" ;;
  settings) echo "restart: healthy_after=1s (default 60s: a worker that ran 1 s restarts at once after a crash; the default would back a second crash within 60 s off by 100 ms), otherwise defaults (backoff_initial 100ms floor between starts of one slot, doubling to 30s, flapping 5 exits/10s); ready.check none; output = \"socket\" (one fd per worker in the agent: 10,000 workers fit in a 20,000 fd limit); stop = hatchery stop SITE (SIGTERM, 30s timeout, returns when every worker has exited); cgroup_base auto (root: one cgroup leaf per worker, born there with CLONE_INTO_CGROUP)" ;;
  config)   d=$1; n=$2; shift 2
            mkdir -p "$d/sites.d"
            printf 'control_socket = "%s/control.sock"\nstate_dir = "%s/state"\nsites_dir = "%s/sites.d"\n' "$d" "$d" "$d" > "$d/hatchery.toml"
            args=$(printf '"%s", ' "$@"); args=${args%, }
            printf 'name = "bench"\ncommand = [%s]\nworkers = %s\noutput = "socket"\n[restart]\nhealthy_after = "1s"\n' "$args" "$n" > "$d/sites.d/bench.toml" ;;
  start)    exec "$BIN" agent --config "$1/hatchery.toml" 2>"$1/agent.log" ;;
  stop)     exec "$BIN" --socket "$1/control.sock" stop bench >/dev/null 2>&1 ;;
  teardown) kill -TERM "$PB_START_PID" 2>/dev/null || true ;;
esac
