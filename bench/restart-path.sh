#!/bin/bash
# usage: bench/restart-path.sh BIN|limit [N] [TRIALS]: where a crashed worker's restart goes,
# from the kernel's scheduler events (`perf record` of sched_process_exit/fork/exec and the
# wake-ups and switches, all CPUs). One supervisor, the agent BIN (the harness adapter's site)
# or the harness's `limitsup`, with N pbworker workers (default 100); TRIALS times (default
# 60) one worker that ran over a second is sent SIGKILL, with a random gap of 0.2-0.5 s. For
# each restart, from the victim's exit: the supervisor's first wake-up, its first switch-in,
# its fork of the replacement, the replacement's exec; medians in microseconds. Root, perf;
# `bash ../shared/bench/setup.sh` builds pbworker and limitsup.
set -u
BIN=$1; N=${2:-100}; TRIALS=${3:-60}; d=$(mktemp -d /tmp/hrp-XXXX)
W=${PB_WORKER:-/tmp/peers-bench/bin/pbworker}
HERE=$(cd "$(dirname "$0")/.." && pwd)
. "$HERE/bench/lib.sh"
start_supervisor "$BIN" "$N" "$W" "$d"
wait_for_workers "$sup" "$N" restart-path "$d"
sleep 1.5
perf record -q -o "$d/perf.data" -e sched:sched_process_exit,sched:sched_process_fork \
  -e sched:sched_process_exec,sched:sched_switch,sched:sched_wakeup -a -- \
  python3 - "$sup" "$TRIALS" <<'P'
import os, random, signal, sys, time
sup, trials = int(sys.argv[1]), int(sys.argv[2])
def workers():
    out = []
    for t in os.listdir(f"/proc/{sup}/task"):
        with open(f"/proc/{sup}/task/{t}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out
born = {p: time.monotonic() - 10 for p in workers()}  # running since before the 1.5 s
for _ in range(trials):
    now, live = time.monotonic(), workers()
    for p in live:
        born.setdefault(p, now)
    old = [p for p in live if now - born[p] > 1.0]
    time.sleep(0.2 + random.random() * 0.3)
    try:
        os.kill(random.choice(old), signal.SIGKILL)
    except ProcessLookupError:  # a zombie the children list showed, reaped since
        pass
P
kill -TERM "$sup"; wait "$sup" 2>/dev/null
perf script -i "$d/perf.data" -F comm,pid,time,event,trace 2>/dev/null | python3 -c '
import re, statistics, sys
ev = []
for l in sys.stdin:
    m = re.match(r"\s*(\S.*?)\s+(\d+)\s+([\d.]+):\s+\S+:(\S+):\s+(.*)", l)
    if m:
        ev.append((float(m.group(3)), m.group(1), int(m.group(2)), m.group(4), m.group(5)))
sup = sys.argv[1]
rows = []
for i, (t0, comm, pid, e, tr) in enumerate(ev):
    if e != "sched_process_exit" or comm != "pbworker":
        continue
    wake = run = fork = child = None
    for t, c, p, e2, tr2 in ev[i + 1:]:
        if t - t0 > 0.05:
            break
        if e2 == "sched_wakeup" and wake is None and f" pid={sup} " in tr2:
            wake = t
        if e2 == "sched_switch" and run is None and f"next_pid={sup} " in tr2:
            run = t
        if e2 == "sched_process_fork" and fork is None and p == int(sup):
            fork, child = t, int(re.search(r"child_pid=(\d+)", tr2).group(1))
        if e2 == "sched_process_exec" and p == child:
            rows.append([x - t0 for x in (wake or t0, run or t0, fork, t)])
            break
        if e2 == "sched_process_exit" and c == "pbworker":
            break
names = ["woken", "running", "forked", "exec\x27d"]
med = [statistics.median(r[k] for r in rows) * 1e6 for k in range(4)]
print(f"{len(rows)} restarts, medians from the exit [us]: " +
      ", ".join(f"{n} {m:.0f}" for n, m in zip(names, med)) +
      f"; fork to exec {statistics.median(r[3] - r[2] for r in rows) * 1e6:.0f}")
' "$sup"
[ -n "${KEEP:-}" ] && echo "kept $d" || rm -rf "$d"
