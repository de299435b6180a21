#!/bin/bash
# usage: bench/coldstart.sh BIN N: an agent (cgroup_base = "off") with one site of N
# /bin/sleep workers; prints the time from the first to the last `spawned` log line.
BIN=$1; N=$2; D=$(mktemp -d /tmp/cs.XXXX); mkdir -p $D/sites.d
cat > $D/hatchery.toml <<T
control_socket = "$D/c.sock"
state_dir = "$D/state"
sites_dir = "$D/sites.d"
cgroup_base = "off"
T
printf 'name = "bench"\ncommand = ["/bin/sleep", "3600"]\nworkers = %s\n' $N > $D/sites.d/bench.toml
HATCHERY_LOG=debug $BIN agent --config $D/hatchery.toml > $D/log 2>&1 &
A=$!
for i in $(seq 1 300); do c=$(grep -c ' spawned' $D/log); [ "$c" -ge "$N" ] && break; sleep 0.1; done
kill -TERM $A; wait $A
python3 - $D/log <<'P'
import sys,re,datetime
ts=[l.split()[0] for l in open(sys.argv[1]) if ' spawned' in l]
ts=[re.sub(r'\x1b\[[0-9;]*m','',t) for t in ts]
p=lambda t: datetime.datetime.fromisoformat(t.replace('Z','+00:00'))
print(f"{len(ts)} spawns in {(p(ts[-1])-p(ts[0])).total_seconds():.3f}s")
P
rm -rf $D
