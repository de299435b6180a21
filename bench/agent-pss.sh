#!/bin/bash
# The agent's memory with N sleep workers (one site, the harness adapter's settings):
# PSS of the agent and of its fd holder once every worker runs, from smaps_rollup, then a
# timed `hatchery stop`. Nothing asks the agent for its status meanwhile (a status with
# 10,000 workers is a few MB of reply that the heap keeps for a while). Root; raises
# kernel.pid_max while it runs if N needs it.
#
#   bench/agent-pss.sh [N] [BIN]   # defaults: 10000, target/dist/hatchery (the packaged build,
#                                  # `cargo build --profile dist`), else target/release/hatchery
set -eu
N=${1:-10000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
default=$HERE/target/dist/hatchery
[ -x "$default" ] || default=$HERE/target/release/hatchery
BIN=${2:-$default}
d=$(mktemp -d /tmp/hatchery-pss-XXXXXX)
old_pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$old_pid_max" -lt $((3 * N + 4096)) ] && echo $((3 * N + 4096)) > /proc/sys/kernel/pid_max
cleanup() {
  "$BIN" --socket "$d/control.sock" stop bench > /dev/null 2>&1 || true
  [ -n "${agent:-}" ] && kill -TERM "$agent" 2> /dev/null && wait "$agent" 2> /dev/null || true
  echo "$old_pid_max" > /proc/sys/kernel/pid_max
  rm -rf "$d"
}
trap cleanup EXIT
bash "$HERE/bench/hatchery.sh" config "$d" "$N" /bin/sleep 100000
"$BIN" agent --config "$d/hatchery.toml" 2> "$d/agent.log" &
agent=$!
t0=$(date +%s%N)
until [ "$(pgrep -c -P "$agent" -x sleep || true)" = "$N" ]; do
  kill -0 "$agent" || { cat "$d/agent.log"; exit 1; }
  sleep 0.2
done
echo "N=$N: $(( ($(date +%s%N) - t0) / 1000000 )) ms until every worker runs"
sleep 2
pss() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }
holder=$(pgrep -f "hatchery fd-holder --socket $d/" | head -1 || true)
a=$(pss "$agent"); h=$([ -n "$holder" ] && pss "$holder" || echo 0)
printf 'agent PSS %.1f MiB, fd holder %.1f MiB, together %.1f MiB\n' \
  "$(echo "$a/1024" | bc -l)" "$(echo "$h/1024" | bc -l)" "$(echo "($a+$h)/1024" | bc -l)"
t1=$(date +%s%N)
"$BIN" --socket "$d/control.sock" stop bench > /dev/null
echo "hatchery stop: $(( ($(date +%s%N) - t1) / 1000000 )) ms"
