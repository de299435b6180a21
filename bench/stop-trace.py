#!/usr/bin/env python3
"""Where the time of a stop went, from a trace of bench/stop-trace.sh (perf script output):
the window from the first SIGTERM to the last worker's exit, each CPU's time in it by
command (`swapper` is a CPU with nothing to run), and when a CPU idled: whether every
worker signalled so far had exited, and where the supervisor (the sender of the first
SIGTERM) was meanwhile (running, runnable behind another task, asleep); and how the signals
went out: the gap between two signals the supervisor sent with no switch between them (the
cost of one signal, its wake-up included), and how often it was switched out while sending.
Given the stop command's pid (the shell bench/stop-trace.sh forked for the adapter's `stop`),
also that command's steps from its fork, as the harness times a stop: its `execve`s, its
`connect` and the reads of the reply (Hatchery's CLI), the first signal to a worker, the last
worker's exit, its own exit; the harness's figure is the later of the last two.

A process has exited when it tells its parent: the SIGCHLD it generates in `exit_notify`
(traced unless the parent set SIGCHLD to SIG_IGN: none here does), where the harness's proc
connector event and the pidfd's readiness come too. `sched_process_exit` is no mark of it:
it is traced early in `do_exit`, before the process's files are closed and its parent told
(on this host's 6.18, since a 2025 change that gave it its `group_dead` field, before even
its memory is let go), and an exiting process can wait for a CPU between the two: by
hundreds of ms when thousands exit at once."""
import bisect
import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):(.*)$")
SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")


def told_parent(ev, rest):
    """Whether a row is its process's SIGCHLD to its parent (the row's process exiting)."""
    return "signal_generate" in ev and "sig=17 " in rest


def client_steps(rows, client, first_signal, last_exit):
    """The stop command's steps, in ms from its fork (see the docstring)."""
    steps = [(first_signal, "the first signal to a worker"), (last_exit, "the last worker's exit")]
    for t, comm, pid, _, ev, rest in rows:
        if "sched_process_fork" in ev and f"child_pid={client} " in rest + " ":
            steps.append((t, "forked"))
        elif pid != client:
            continue
        elif "sched_process_exec" in ev:
            steps.append((t, "exec " + rest.split()[0].removeprefix("filename=")))
        elif "sys_enter_connect" in ev:
            steps.append((t, "connect"))
        elif "sys_exit_recvfrom" in ev:
            steps.append((t, "a read returned"))
        elif told_parent(ev, rest):
            steps.append((t, "exited"))
    forked = [t for t, what in steps if what == "forked"]
    if not forked:
        print(f"the stop command ({client}): its fork is not in the trace")
        return
    if not any(what == "exited" for _, what in steps):
        print(f"the stop command ({client}): its exit is not in the trace (events lost?)")
        return
    ended = max(t for t, what in steps if what in ("exited", "the last worker's exit"))
    print(f"the stop command ({client}), in ms from its fork; the stop as the harness times it: "
          f"{1000 * (ended - forked[0]):.2f} ms")
    for t, what in sorted(steps):
        print(f"  {1000 * (t - forked[0]):8.3f}  {what}")


def main(path, client=None):
    rows = []
    for line in open(path):
        m = LINE.match(line)
        if m:
            rows.append((float(m[4]), m[1], int(m[2]), int(m[3]), m[5], m[6]))
    signals = [r for r in rows
               if "signal_generate" in r[4] and "sig=15 " in r[5] and "comm=pbworker " in r[5]]
    exits = sorted(r[0] for r in rows if r[1] == "pbworker" and told_parent(r[4], r[5]))
    if not signals or not exits:
        sys.exit(f"{path}: no SIGTERM or no pbworker exit in the trace")
    t0, t1, sup = signals[0][0], exits[-1], signals[0][2]
    sent = [r[0] for r in signals if r[2] == sup]
    ms = lambda t: 1000 * (t - t0)
    if len(exits) < len(sent):
        print(f"only {len(exits)} exits for {len(sent)} signals in the trace (events lost?): "
              "the last exit may be missing")
    print(f"{len(sent)} signals sent by {signals[0][1]} in {ms(sent[-1]):.1f} ms; "
          f"{len(exits)} exits, the last at {ms(t1):.1f} ms")

    busy = defaultdict(float)
    since, idle_from, idles, sup_state = {}, {}, [], []
    for t, _, _, cpu, ev, rest in rows:
        if "sched_switch" not in ev:
            continue
        m = SWITCH.search(rest)
        if not m:
            continue
        prev, prev_pid, state, nxt, next_pid = m[1], int(m[2]), m[3], m[4], int(m[5])
        if cpu in since:
            a, b = max(since[cpu], t0), min(t, t1)
            if b > a:
                busy[re.sub(r"[/:]\d.*", "", prev)] += b - a
        since[cpu] = t
        if nxt.startswith("swapper"):
            idle_from[cpu] = t
        elif prev.startswith("swapper") and cpu in idle_from:
            a = idle_from.pop(cpu)
            if a < t1 and t > t0:
                idles.append((max(a, t0), min(t, t1)))
        if prev_pid == sup:
            sup_state.append((t, "runnable, waiting" if state.startswith("R") else "asleep"))
        if next_pid == sup:
            sup_state.append((t, "running"))
    print(f"window {ms(t1):.0f} ms, CPU time in it (ms): " +
          ", ".join(f"{k} {1000 * v:.0f}" for k, v in sorted(busy.items(), key=lambda x: -x[1])[:7]))
    sup_state.sort()
    where, dry = Counter(), 0.0
    for a, b in idles:
        i = bisect.bisect(sup_state, (a, "~")) - 1
        where[sup_state[i][1] if i >= 0 else "unknown"] += b - a
        if bisect.bisect(sent, a) - bisect.bisect(exits, a) <= 2:
            dry += b - a
    total = sum(b - a for a, b in idles)
    print(f"a CPU idle {1000 * total:.1f} ms in all; the supervisor meanwhile: " +
          ", ".join(f"{k} {1000 * v:.1f}" for k, v in where.most_common()) +
          f"; every signalled worker gone (2 at most left) for {1000 * dry:.1f} ms of it")

    # The supervisor's signals and its switches out while it sent them, in order.
    first, last = sent[0], sent[-1]
    out = Counter()
    gaps, prev = [], None
    for t, _, pid, _, ev, rest in rows:
        if "signal_generate" in ev and pid == sup and "sig=15 " in rest and "comm=pbworker " in rest:
            if prev is not None:
                gaps.append(1e6 * (t - prev))
            prev = t
        elif "sched_switch" in ev and first <= t <= last:
            m = SWITCH.search(rest)
            if m and int(m[2]) == sup:
                out[("preempted by " if m[3].startswith("R") else "asleep, then ") +
                    re.sub(r"[/:]\d.*", "", m[4])] += 1
                prev = None
    if gaps:
        gaps.sort()
        print(f"{len(gaps)} of {len(sent) - 1} pairs of signals sent back to back, a median "
              f"{gaps[len(gaps) // 2]:.0f} µs apart; "
              f"switched out {sum(out.values())} times while sending: " +
              ", ".join(f"{k} {v}" for k, v in out.most_common(4)))

    if client is not None:
        client_steps(rows, client, t0, t1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
