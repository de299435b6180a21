#!/bin/bash
# A system-wide trace of one stop of N pbworker workers (perf: signals sent, process exits,
# context switches, and the stop command's own steps), then where its time went
# (bench/stop-trace.py):
#   bench/stop-trace.sh hatchery BIN [N]    a fresh agent with the harness's site, `hatchery stop`
#   bench/stop-trace.sh limit [N]           ../shared/bench's limitsup, its SIGTERM
#   bench/stop-trace.sh limitleaf [N]       bench/limitleaf.c (limitsup, a cgroup leaf per
#                                           worker), its SIGTERM; LIMITLEAF_SETSID=1 in the
#                                           environment: each worker in a session of its own
# The stop goes through the harness's adapter: its `stop` (bench/hatchery.sh, the harness's
# adapters/limit.sh: `exec kill`), run by a shell of its own, whose steps bench/stop-trace.py
# prints from that shell's fork (the harness spawns the adapter itself, so its launch differs
# by a fork); limitleaf's the same way as limit's.
# Needs perf, and pbworker and limitsup from ../shared/bench/setup.sh (the harness in
# ../shared/bench, or PEERS_HARNESS); raise kernel.pid_max for N = 10,000. The trace stays in
# /tmp/stop-trace-WHO.txt (WHO limitleaf-sid with LIMITLEAF_SETSID=1).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
BIN_DIR=${PEERS_BIN:-/tmp/peers-bench/bin}
W=$BIN_DIR/pbworker
who=$1; shift
out=$who; [ "$who" = limitleaf ] && [ "${LIMITLEAF_SETSID:-}" = 1 ] && out=limitleaf-sid
if [ "$who" = hatchery ]; then bin=$1; shift; fi
N=${1:-10000}
d=$(mktemp -d /tmp/stop-trace-XXXX)
case $who in
  hatchery)
    bash "$HERE/hatchery.sh" config "$d" "$N" "$W"
    "$bin" agent --config "$d/hatchery.toml" > "$d/agent.log" 2>&1 & sup=$! ;;
  limitleaf)
    ll=$HERE/../target/bench/limitleaf
    mkdir -p "${ll%/*}" && cc -O2 -Wall -o "$ll" "$HERE/limitleaf.c"
    cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
    "$ll" "$cg/limitleaf-trace.$$" "$N" "$W" & sup=$! ;;
  *)
    "$BIN_DIR/limitsup" "$N" "$W" & sup=$! ;;
esac
wait_for_workers "$sup" "$N" stop-trace "$d"
sleep 3
perf record -m 32M -e signal:signal_generate -e sched:sched_switch \
  -e sched:sched_process_fork -e sched:sched_process_exec -e syscalls:sys_enter_connect \
  -e syscalls:sys_exit_recvfrom -a -o "$d/perf.data" 2> /dev/null & pp=$!
sleep 1
s=$(date +%s%N)
status=0
if [ "$who" = hatchery ]; then
  HATCHERY_BIN=$bin PB_START_PID=$sup bash "$HERE/hatchery.sh" stop "$d" & client=$!
  wait "$client" || status=$?
else
  harness=${PEERS_HARNESS:-$HERE/../../shared/bench}
  PB_BIN=$BIN_DIR PB_START_PID=$sup bash "$harness/adapters/limit.sh" stop "$d" & client=$!
  wait "$client" || status=$?
  [ "$status" = 0 ] && { wait "$sup" || true; }
fi
e=$(date +%s%N)
sleep 0.5
kill -INT "$pp"; wait "$pp" || true
# The supervisor is stopped whatever the stop did (limitsup is gone after a stop that worked).
kill "$sup" 2> /dev/null && { wait "$sup" || true; }
if [ "$status" != 0 ]; then
  echo "stop-trace: the stop command failed (exit $status; the adapter hides its output)" >&2
  rm -rf "$d"
  exit 1
fi
perf script -i "$d/perf.data" -F comm,pid,cpu,time,event,trace 2> /dev/null > "/tmp/stop-trace-$out.txt"
rm -rf "$d"
# From before the shell's fork to after its exit (and limitsup's, for limit and limitleaf).
echo "$who: the stop command took $(( (e - s) / 1000 )) us"
python3 "$HERE/stop-trace.py" "/tmp/stop-trace-$out.txt" "$client"
