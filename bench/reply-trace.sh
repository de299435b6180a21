#!/bin/bash
# A system-wide trace of the end of one `hatchery stop` of N pbworker workers (default 1000):
# the last worker's exit, the agent's writes (the reply among them), when the CLI is woken and
# when it runs, and what ran on each CPU meanwhile. For the time from the last exit to the
# CLI's return (the issue allows 10 ms).
#   bench/reply-trace.sh BIN [N]
# Needs perf, and pbworker from ../shared/bench/setup.sh; raise kernel.pid_max for N = 10,000.
# Only the agent's writes are traced: perf's own writes of its buffers, traced system-wide,
# flood the trace at 10,000 and its events are lost.
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
perf record -m 16M -e signal:signal_generate -e sched:sched_process_exit -e sched:sched_switch \
  -e sched:sched_wakeup -e syscalls:sys_enter_write --filter "common_pid == $sup" -a -o "$d/perf.data" 2> /dev/null & pp=$!
sleep 1
"$BIN" --socket "$d/control.sock" stop bench > /dev/null 2>&1 & cli=$!
wait "$cli"
sleep 0.3
kill -INT "$pp"; wait "$pp" || true
kill "$sup"; wait "$sup" || true
perf script -i "$d/perf.data" -F comm,pid,tid,cpu,time,event,trace 2> /dev/null > "$d/trace.txt"
python3 - "$d/trace.txt" "$sup" "$cli" <<'P'
import re, sys
path, agent, cli = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = []
for line in open(path):
    m = re.match(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):(.*)$', line)
    if m:
        rows.append((float(m[5]), m[1], int(m[2]), int(m[4]), m[6], m[7]))
# A worker has exited once it is a zombie: its switch out in state Z follows `exit_notify`
# (its pidfd readable, the harness's proc connector event). `sched_process_exit` is no mark
# of it: it is traced early in `do_exit` (see bench/stop-trace.py), and thousands of exiting
# workers can wait for a CPU between the two.
exits = [r[0] for r in rows if 'sched_switch' in r[4] and 'prev_comm=pbworker' in r[5]
         and 'prev_state=Z' in r[5]]
last = max(exits)
print(f"{len(exits)} exits; times below in ms after the last one")
for t, comm, pid, cpu, ev, rest in rows:
    if t < last - 0.0005:
        continue
    mine = pid in (agent, cli) and ('write' in ev or 'exit' in ev)
    woke = 'sched_wakeup' in ev and f'pid={cli} ' in rest
    switch = 'sched_switch' in ev
    if mine or woke or switch:
        rest = re.sub(r'(prev|next)_prio=\d+ ?', '', rest)
        print(f"{1000 * (t - last):8.3f} cpu{cpu} {comm}/{pid} {ev.split(':')[1]} {rest.strip()[:90]}")
    if 'sched_process_exit' in ev and pid == cli:
        break
P
rm -rf "$d"
