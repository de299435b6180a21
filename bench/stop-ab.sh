#!/bin/bash
# Times `hatchery stop` of N workers (the CLI's wall time) for several builds side by side:
#   bench/stop-ab.sh N BLOCKS REPS NAME:BIN[:VAR=VALUE] ...
# One agent at a time (agents on one host share the cgroup base: a second agent kills what it
# finds there). Each block runs each build in turn: its agent with the harness's site
# (`bench/hatchery.sh config`, pbworker from ../shared/bench/setup.sh), REPS stop/start cycles
# timed once all N run, then the agent stopped. Prints one line per stop: name, block.rep, µs.
# Raise kernel.pid_max for N = 10,000.
set -eu
N=$1; BLOCKS=$2; REPS=$3; shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
W=${PBWORKER:-/tmp/peers-bench/bin/pbworker}
count() { pgrep -c -P "$1" -x pbworker || true; }
for b in $(seq "$BLOCKS"); do
  for spec in "$@"; do
    IFS=: read -r name bin var <<< "$spec"
    d=$(mktemp -d /tmp/stop-ab-XXXX)
    bash "$HERE/hatchery.sh" config "$d" "$N" "$W"
    env ${var:+"$var"} "$bin" agent --config "$d/hatchery.toml" 2> "$d/agent.log" & a=$!
    for r in $(seq "$REPS"); do
      until [ "$(count $a)" = "$N" ]; do sleep 0.2; done
      sleep 1
      s=$(date +%s%N)
      "$bin" --socket "$d/control.sock" stop bench > /dev/null 2>&1
      e=$(date +%s%N)
      echo "$name $b.$r $(( (e - s) / 1000 ))"
      "$bin" --socket "$d/control.sock" start bench > /dev/null 2>&1
    done
    kill "$a"; wait "$a" || true
    rm -rf "$d"
  done
done
