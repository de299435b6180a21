#!/bin/bash
# The workers of a supervisor sent SIGTERM by a fresh process (bench/killall.c), the supervisor
# stopped meanwhile (SIGSTOP: it restarts nothing), traced as bench/stop-trace.sh traces a stop:
#   bench/stop-ext.sh hatchery BIN [N]   a fresh agent with the harness's site
#   bench/stop-ext.sh limitleaf [N]      bench/limitleaf.c, each worker in a session of its own
#   bench/stop-ext.sh limitleaf-two [N]  two of them with N/2 workers each, started at once (so
#                                        that starts run on both CPUs, as Hatchery's do)
# Tells whether what bench/stop-trace.py finds (how often the sender is preempted by the workers
# it wakes) comes from the supervisor or from its workers. The trace stays in
# /tmp/stop-ext-WHO.txt. Needs perf, pbworker from ../shared/bench/setup.sh, a C compiler.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
W=${PEERS_BIN:-/tmp/peers-bench/bin}/pbworker
who=$1; shift
if [ "$who" = hatchery ]; then bin=$1; shift; fi
N=${1:-1000}
out=$HERE/../target/bench
mkdir -p "$out"
cc -O2 -Wall -o "$out/killall" "$HERE/killall.c"
d=$(mktemp -d /tmp/stop-ext-XXXX)
case $who in
  hatchery)
    bash "$HERE/hatchery.sh" config "$d" "$N" "$W"
    "$bin" agent --config "$d/hatchery.toml" > "$d/agent.log" 2>&1 & sup=$! ;;
  limitleaf|limitleaf-two)
    cc -O2 -Wall -o "$out/limitleaf" "$HERE/limitleaf.c"
    cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
    if [ "$who" = limitleaf ]; then
      LIMITLEAF_SETSID=1 "$out/limitleaf" "$cg/limitleaf-ext.$$" "$N" "$W" & sup=$!
    else
      LIMITLEAF_SETSID=1 "$out/limitleaf" "$cg/limitleaf-ext2.$$" $((N - N / 2)) "$W" & sup2=$!
      LIMITLEAF_SETSID=1 "$out/limitleaf" "$cg/limitleaf-ext.$$" $((N / 2)) "$W" & sup=$!
      wait_for_workers "$sup2" $((N - N / 2)) stop-ext "$d"
      N=$((N / 2))
    fi ;;
  *) echo "usage: $0 hatchery BIN [N] | limitleaf [N] | limitleaf-two [N]" >&2; exit 2 ;;
esac
sup2=${sup2:-}
wait_for_workers "$sup" "$N" stop-ext "$d"
# In a random order across the supervisors.
{ pgrep -P "$sup" -x pbworker; [ -z "$sup2" ] || pgrep -P "$sup2" -x pbworker; } | sort -R > "$d/pids"
sleep 3
kill -STOP "$sup" $sup2
perf record -m 32M -e signal:signal_generate -e sched:sched_process_exit -e sched:sched_switch \
  -a -o "$d/perf.data" 2> /dev/null & pp=$!
sleep 1
"$out/killall" "$d/pids"
sleep 0.5
kill -INT "$pp"; wait "$pp" || true
kill -CONT "$sup" $sup2; kill "$sup" $sup2; wait "$sup" $sup2 || true
perf script -i "$d/perf.data" -F comm,pid,cpu,time,event,trace 2> /dev/null > "/tmp/stop-ext-$who.txt"
rm -rf "$d"
python3 "$HERE/stop-trace.py" "/tmp/stop-ext-$who.txt"
