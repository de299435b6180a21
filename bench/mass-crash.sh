#!/bin/bash
# usage: bench/mass-crash.sh BIN|limit N [perf]: mass-crash recovery of one supervisor, the
# agent BIN (the harness adapter's site) or the harness's `limitsup`, with N pbworker workers
# (`bash ../shared/bench/setup.sh` builds both): kill -9 of every worker at once, then the
# time until N new ones run, the supervisor's CPU time meanwhile, and the machine's: CPU time
# busy and idle (all CPUs, /proc/stat). New workers are counted from the supervisor's
# children lists every 20 ms (a new one counts from its clone, a few hundred microseconds
# before its exec): a light poller, so that what the recovery leaves idle shows. With a
# third argument (an agent only), `perf record` of the agent's context switches (where it
# waits) into /tmp/mass-crash.perf. Root; raise kernel.pid_max for N = 10,000.
set -u
BIN=$1; N=$2; d=$(mktemp -d /tmp/hmc-XXXX)
W=${PB_WORKER:-/tmp/peers-bench/bin/pbworker}
HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/bench/lib.sh"
start_supervisor "$BIN" "$N" "$W" "$d"
wait_for_workers "$sup" "$N" mass-crash "$d"
sleep 3
[ -n "${3:-}" ] && { perf record -e sched:sched_switch -g -p $sup -o /tmp/mass-crash.perf 2>/dev/null & pp=$!; sleep 1; }
python3 - $sup $N <<'P'
import os, signal, sys, time
sup, n = int(sys.argv[1]), int(sys.argv[2])
lists = [f"/proc/{sup}/task/{t}/children" for t in os.listdir(f"/proc/{sup}/task")]
def children():
    out = set()
    for path in lists:
        try:
            out |= set(map(int, open(path).read().split()))
        except OSError:
            pass
    return out
def worker(p):
    try:
        return open(f"/proc/{p}/comm").read().strip() == "pbworker"
    except OSError:
        return False
def cpu():
    f = open(f"/proc/{sup}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def machine():
    f = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(f) / os.sysconf("SC_CLK_TCK"), (f[3] + f[4]) / os.sysconf("SC_CLK_TCK")
old = {p for p in children() if worker(p)}
c0, m0, t0 = cpu(), machine(), time.monotonic()
for p in old:
    os.kill(p, signal.SIGKILL)
t1 = time.monotonic()
while len(children() - old) < n:
    time.sleep(0.02)
t2, m1 = time.monotonic(), machine()
idle = m1[1] - m0[1]
print(f"killed {len(old)} in {t1 - t0:.3f}s; {n} new after {t2 - t0:.3f}s; "
      f"supervisor cpu {cpu() - c0:.2f}s; machine busy {m1[0] - m0[0] - idle:.2f}s, idle {idle:.2f}s")
P
[ -n "${3:-}" ] && { kill -INT $pp; wait $pp; }
[ "$BIN" = limit ] || "$BIN" --socket "$d/control.sock" stop bench > /dev/null
kill $sup; wait $sup; rm -rf "$d"
