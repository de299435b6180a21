#!/usr/bin/env python3
"""Crash recovery benchmark (issue 11): how long a new agent takes to adopt the workers of
one that was SIGKILLed, against how long a cold start of the same workers takes, in one run.

For N `sleep` workers of one site (cgroups as the agent finds them, or --cgroups off):
  cold    spawn of the agent -> `status` shows N workers running (a fresh start)
  adopt   spawn of a new agent after `kill -9` of the old one -> `status` shows the same
          N pids again; and the agent's own figure, from its log line
          "supervising N adopted workers ..., T µs after the agent started" (from the
          start of its setup to every adopted worker's pidfd watched)
Medians over --reps repetitions (min-max beside). Python 3 standard library only.

Usage: bench/recovery/run.py [--workers 1000] [--reps 5] [--cgroups auto|off] [--hatchery BIN]
Everything lives under a fresh /tmp/bench-recovery.* directory; the agent is stopped on exit.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class Agent:
    def __init__(self, binary, root, workers, cgroups):
        self.binary = binary
        self.root = root
        self.sock = os.path.join(root, "control.sock")
        os.makedirs(os.path.join(root, "sites.d"), exist_ok=True)
        with open(os.path.join(root, "agent.toml"), "w") as f:
            f.write('control_socket = "%s"\nstate_dir = "%s/state"\nsites_dir = "%s/sites.d"\ncgroup_base = "%s"\n'
                    % (self.sock, root, root, cgroups))
        with open(os.path.join(root, "sites.d", "many.toml"), "w") as f:
            f.write('name = "many"\ncommand = ["/bin/sleep", "100000"]\nworkers = %d\n[stop]\ntimeout = "5s"\n' % workers)
        self.proc = None
        self.log_path = os.path.join(root, "agent.log")

    def spawn(self):
        logf = open(self.log_path, "a")
        env = dict(os.environ, HATCHERY_LOG="info")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([self.binary, "agent", "--config", os.path.join(self.root, "agent.toml")],
                                     stdout=logf, stderr=logf, env=env)
        return t0

    def status(self):
        p = subprocess.run([self.binary, "--socket", self.sock, "status", "many", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout)["sites"][0]

    def wait_pids(self, n, deadline_s=120):
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            s = None
            try:
                s = self.status()
            except (subprocess.TimeoutExpired, ValueError):
                pass
            if s:
                pids = sorted(w["pid"] for w in s["workers"] if w.get("pid"))
                if len(pids) == n:
                    return time.monotonic(), pids
            time.sleep(0.002)
        raise RuntimeError("timed out waiting for %d workers" % n)

    def crash(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def adoption_us(self):
        with open(self.log_path) as f:
            found = re.findall(r"supervising (\d+) adopted workers of \d+ sites, (\d+) µs", f.read())
        return found[-1] if found else None


def fmt(xs, unit=1000.0):
    xs = [x * unit for x in xs]
    return "%.1f ms (%.1f–%.1f)" % (statistics.median(xs), min(xs), max(xs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cgroups", default="auto")
    ap.add_argument("--hatchery", default=os.path.join(REPO, "target", "release", "hatchery"))
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-recovery.")
    agent = Agent(a.hatchery, root, a.workers, a.cgroups)
    cold, adopt_wall, adopt_own = [], [], []
    try:
        for rep in range(a.reps):
            t0 = agent.spawn()
            t1, pids = agent.wait_pids(a.workers)
            cold.append(t1 - t0)
            agent.crash()
            t0 = agent.spawn()
            t1, again = agent.wait_pids(a.workers)
            if again != pids:
                raise RuntimeError("rep %d: the workers were not adopted (%d of %d pids kept)"
                                   % (rep, len(set(again) & set(pids)), len(pids)))
            adopt_wall.append(t1 - t0)
            own = agent.adoption_us()
            if not own or int(own[0]) != a.workers:
                raise RuntimeError("rep %d: no adoption line for %d workers in the agent's log" % (rep, a.workers))
            adopt_own.append(int(own[1]) / 1e6)
            agent.stop()
            log("rep %d: cold %.1f ms, adopt %.1f ms (agent's own %.1f ms)"
                % (rep, cold[-1] * 1000, adopt_wall[-1] * 1000, adopt_own[-1] * 1000))
    finally:
        agent.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("| N = %d, cgroups %s | median (min–max) over %d |" % (a.workers, a.cgroups, a.reps))
    print("|---|---|")
    print("| cold start: spawn to `status` showing N workers | %s |" % fmt(cold))
    print("| adoption: spawn of a new agent after `kill -9` to `status` showing the same N pids | %s |" % fmt(adopt_wall))
    print("| adoption, the agent's own figure: setup start to every adopted pidfd watched | %s |" % fmt(adopt_own))
    print("| ratio adoption / cold start (wall) | %.2f× |" % (statistics.median(adopt_wall) / statistics.median(cold)))


if __name__ == "__main__":
    main()
