#!/bin/bash
# usage: bench/mass-crash.sh BIN N [perf]: mass-crash recovery of one agent (the harness
# adapter's site with N pbworker workers: `bash ../shared/bench/setup.sh` builds it): kill -9
# of every worker at once, then the time until N new ones run, and the agent's CPU time
# meanwhile. With a third argument, `perf record` of the agent's context switches (where it
# waits) into /tmp/mass-crash.perf. Polls /proc every 50 ms (a cost the harness's proc
# connector does not have): for comparing builds, not peers. Root.
BIN=$1; N=$2; d=$(mktemp -d /tmp/hmc-XXXX)
W=${PB_WORKER:-/tmp/peers-bench/bin/pbworker}
HERE=$(cd "$(dirname "$0")/.." && pwd)
bash "$HERE/bench/hatchery.sh" config "$d" "$N" $W
"$BIN" agent --config "$d/hatchery.toml" 2> "$d/agent.log" & agent=$!
count() { pgrep -c -P "$agent" -x pbworker || true; }
until [ "$(count)" = "$N" ]; do sleep 0.3; done; sleep 3
[ -n "$3" ] && { perf record -e sched:sched_switch -g -p $agent -o /tmp/mass-crash.perf 2>/dev/null & pp=$!; sleep 1; }
python3 - $agent $N <<'P'
import os,sys,time,signal
agent=int(sys.argv[1]); n=int(sys.argv[2])
def kids():
    out=set()
    for t in os.listdir(f"/proc/{agent}/task"):
        try: out|=set(int(x) for x in open(f"/proc/{agent}/task/{t}/children").read().split())
        except OSError: pass
    return out
def workers():
    w=set()
    for p in kids():
        try:
            if os.readlink(f"/proc/{p}/exe").endswith("pbworker"): w.add(p)
        except OSError: pass
    return w
def cpu():
    f=open(f"/proc/{agent}/stat").read().rsplit(")",1)[1].split()
    return (int(f[11])+int(f[12]))/100
old=workers(); c0=cpu(); t0=time.monotonic()
for p in old: os.kill(p, signal.SIGKILL)
t1=time.monotonic()
while True:
    new=workers()-old
    if len(new)>=n: break
    time.sleep(0.05)
print(f"killed {len(old)} in {t1-t0:.3f}s; {n} new after {time.monotonic()-t0:.3f}s; agent cpu {cpu()-c0:.2f}s")
P
[ -n "$3" ] && { kill -INT $pp; wait $pp; }
"$BIN" --socket "$d/control.sock" stop bench > /dev/null; kill $agent; wait $agent; rm -rf $d
