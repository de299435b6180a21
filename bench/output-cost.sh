#!/bin/bash
# What reading workers' output costs the agent: one worker prints N numbered lines at once
# (`seq 1 N`) through `output = MODE` (pipe or socket); prints the agent's CPU time
# (user + system, from /proc/<pid>/stat, 10 ms ticks) and the wall time until the last line
# is in the site's log.
#
#   bench/output-cost.sh BIN pipe|socket N
#
# Run two binaries side by side, several times, and compare medians (BENCHMARKS.md).
set -euo pipefail
BIN=$1 MODE=$2 N=$3
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkdir "$d/sites.d"
cat > "$d/sites.d/chat.toml" <<EOT
name = "chat"
command = ["/bin/sh", "-c", "seq 1 $N; exec sleep 1000"]
workers = 1
output = "$MODE"
EOT
printf 'control_socket = "%s/c.sock"\nstate_dir = "%s/state"\nsites_dir = "%s/sites.d"\ncgroup_base = "off"\n' \
  "$d" "$d" "$d" > "$d/h.toml"
HATCHERY_LOG=warn "$BIN" agent --config "$d/h.toml" > "$d/out" 2>&1 &
agent=$!
t0=$(date +%s%N)
done=""
for _ in $(seq 1 3000); do
  if [ -f "$d/state/logs/chat.log" ] && tail -c 200 "$d/state/logs/chat.log" | grep -q "\] $N\$"; then
    done=1
    break
  fi
  sleep 0.01
done
t1=$(date +%s%N)
stat=$(cut -d')' -f2- "/proc/$agent/stat")
ticks=$(echo "$stat" | awk '{print $12 + $13}')
kill "$agent"
wait "$agent" 2>/dev/null || true
[ -n "$done" ] || { echo "line $N never reached the log within 30 s" >&2; exit 1; }
echo "$MODE lines=$N agent_cpu_ms=$((ticks * 10)) wall_ms=$(( (t1 - t0) / 1000000 ))"
