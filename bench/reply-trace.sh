#!/bin/bash
# A system-wide trace of the end of one `hatchery stop` of N pbworker workers (default 1000):
# the last worker's exit, the agent's writes (the reply among them), when the CLI is woken and
# when it runs, and what ran on each CPU meanwhile. For the time from the last exit to the
# CLI's return (the issue allows 10 ms).
#   bench/reply-trace.sh BIN [N]
# Needs perf, and pbworker from ../shared/bench/setup.sh; raise kernel.pid_max for N = 10,000.
# Only the writes of the agent's loop thread are traced (the reply among them): perf's own
# writes of its buffers, traced system-wide, flood the trace at 10,000 and events are lost.
set -eu
BIN=$1; N=${2:-1000}
W=${PEERS_BIN:-/tmp/peers-bench/bin}/pbworker
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
d=$(mktemp -d /tmp/reply-trace-XXXX)
bash "$HERE/hatchery.sh" config "$d" "$N" "$W"
"$BIN" agent --config "$d/hatchery.toml" 2> "$d/agent.log" & sup=$!
wait_for_workers "$sup" "$N" reply-trace "$d"
sleep 2
perf record -m 16M -e signal:signal_generate -e sched:sched_switch \
  -e sched:sched_wakeup -e syscalls:sys_enter_write --filter "common_pid == $sup" -a -o "$d/perf.data" 2> /dev/null & pp=$!
sleep 1
"$BIN" --socket "$d/control.sock" stop bench > /dev/null 2>&1 & cli=$!
wait "$cli"
sleep 0.3
kill -INT "$pp"; wait "$pp" || true
kill "$sup"; wait "$sup" || true
perf script -i "$d/perf.data" -F comm,pid,tid,cpu,time,event,trace 2> /dev/null > "$d/trace.txt"
python3 - "$d/trace.txt" "$sup" "$cli" "$N" <<'P'
import re, sys
path, agent, cli, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = []
for line in open(path):
    m = re.match(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):(.*)$', line)
    if m:
        rows.append((float(m[5]), m[1], int(m[2]), int(m[4]), m[6], m[7]))
# A process has exited when it tells its parent: the SIGCHLD it generates in `exit_notify`
# (not traced if the parent set it to SIG_IGN; the agent and bash do not), where the
# harness's proc connector event and the pidfd's readiness come too.
# `sched_process_exit` is no mark of it: it is traced early in `do_exit` (see
# bench/stop-trace.py), and thousands of exiting workers can wait for a CPU between the two.
def told(r, who=None):
    return ('signal_generate' in r[4] and 'sig=17 ' in r[5]
            and (r[1] == 'pbworker' if who is None else r[2] == who))
exits = [r[0] for r in rows if told(r)]
if not exits:
    sys.exit(f"{path}: no worker's exit in the trace (events lost?)")
last = max(exits)
print(f"{len(exits)} exits; times below in ms after the last one")
if len(exits) < n:
    print(f"{n - len(exits)} of {n} workers' exits are not in the trace (events lost?): "
          "the last one may be among them")
for r in rows:
    t, comm, pid, cpu, ev, rest = r
    if t < last - 0.0005:
        continue
    gone = told(r, cli)
    mine = pid == agent and 'write' in ev
    woke = 'sched_wakeup' in ev and f'pid={cli} ' in rest
    switch = 'sched_switch' in ev
    if gone or mine or woke or switch:
        rest = re.sub(r'(prev|next)_prio=\d+ ?', '', rest)
        what = 'the CLI exited' if gone else rest.strip()[:90]
        print(f"{1000 * (t - last):8.3f} cpu{cpu} {comm}/{pid} {ev.split(':')[1]} {what}")
    if gone:
        break
else:
    print(f"the CLI ({cli}): its exit is not in the trace (events lost?)")
P
rm -rf "$d"
