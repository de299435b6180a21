#!/bin/bash
# Times `hatchery stop` of N workers (the CLI's wall time) for several builds side by side:
#   bench/stop-ab.sh N BLOCKS REPS NAME:BIN[:VAR=VALUE] ...
# One agent at a time (agents on one host share the cgroup base: a second agent kills what it
# finds there). Each block runs each build in turn: its agent with the harness's site
# (`bench/hatchery.sh config`, pbworker from ../shared/bench/setup.sh), REPS stop/start cycles
# timed once all N run, then the agent stopped. Prints one line per stop: name, block.rep, the
# CLI's wall time in µs, and the CPU time of the agent's main thread (its loop) from just before
# the stop to the CLI's return, in µs (`/proc/PID/schedstat`; the reaps after the reply may
# begin before it is read).
# Raise kernel.pid_max for N = 10,000.
set -eu
N=$1; BLOCKS=$2; REPS=$3; shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
W=${PBWORKER:-/tmp/peers-bench/bin/pbworker}
count() { pgrep -c -P "$1" -x pbworker || true; }
# Waits (at most 5 minutes) for all N workers of agent $1 to run.
all_running() {
  local deadline=$((SECONDS + 300))
  until [ "$(count "$1")" = "$N" ]; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$1" 2>/dev/null; then
      echo "stop-ab: $name: $(count "$1") of $N workers running after 5 minutes, or the agent ended (log: $d/agent.log)" >&2
      exit 1
    fi
    sleep 0.2
  done
}
for b in $(seq "$BLOCKS"); do
  for spec in "$@"; do
    IFS=: read -r name bin var <<< "$spec"
    d=$(mktemp -d /tmp/stop-ab-XXXX)
    bash "$HERE/hatchery.sh" config "$d" "$N" "$W"
    env ${var:+"$var"} "$bin" agent --config "$d/hatchery.toml" 2> "$d/agent.log" & a=$!
    for r in $(seq "$REPS"); do
      all_running "$a"
      sleep 1
      read -r c0 _ < "/proc/$a/schedstat"
      s=$(date +%s%N)
      "$bin" --socket "$d/control.sock" stop bench > /dev/null 2>&1
      e=$(date +%s%N)
      read -r c1 _ < "/proc/$a/schedstat"
      echo "$name $b.$r $(( (e - s) / 1000 )) $(( (c1 - c0) / 1000 ))"
      "$bin" --socket "$d/control.sock" start bench > /dev/null 2>&1
    done
    kill "$a"; wait "$a" || true
    rm -rf "$d"
  done
done
