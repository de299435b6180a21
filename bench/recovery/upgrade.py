#!/usr/bin/env python3
"""Upgrade benchmark (issue 11): what `hatchery upgrade` costs the clients, in one run.

An agent with one site of 4 demo workers (50 ms a request) under a bounded HTTP load (8
clients, one request per connection), and a loop of `hatchery status` calls; after a
baseline, `hatchery upgrade` replaces the agent's binary --reps times (alternating two copies
of the same build, so each upgrade executes a different file). Reports, for the baseline and
for the upgrade windows: failed requests, the longest gap between two answered requests, the
slowest `status` call (the control socket's unavailability as a client sees it, process
start of the CLI included), and how long the `upgrade` command took. Python 3 standard
library only.

Usage: bench/recovery/upgrade.py [--reps 5] [--hatchery BIN]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hatchery", default=os.path.join(REPO, "target", "release", "hatchery"))
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-upgrade.")
    bins = [os.path.join(root, "hatchery-a"), os.path.join(root, "hatchery-b")]
    for b in bins:
        shutil.copy2(a.hatchery, b)
    sock = os.path.join(root, "control.sock")
    port = free_port()
    os.makedirs(os.path.join(root, "sites.d"))
    with open(os.path.join(root, "agent.toml"), "w") as f:
        f.write('control_socket = "%s"\nstate_dir = "%s/state"\nsites_dir = "%s/sites.d"\n' % (sock, root, root))
    with open(os.path.join(root, "sites.d", "web.toml"), "w") as f:
        f.write('name = "web"\ncommand = ["%s", "__demo-worker", "--delay-ms", "50"]\nworkers = 4\n'
                '[[listen]]\ntcp = "127.0.0.1:%d"\n[ready]\ncheck = "notify"\n' % (bins[0], port))
    log = open(os.path.join(root, "agent.log"), "w")
    agent = subprocess.Popen([bins[0], "agent", "--config", os.path.join(root, "agent.toml")], stdout=log, stderr=log)
    stop = threading.Event()
    answers = []  # (time answered, ok)
    statuses = []  # (start, duration, ok)
    lock = threading.Lock()

    def client():
        until = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < until:
            ok = request(port)
            with lock:
                answers.append((time.monotonic(), ok))

    def status_loop():
        until = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < until:
            t0 = time.monotonic()
            p = subprocess.run([bins[0], "--socket", sock, "status", "--json"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
            with lock:
                statuses.append((t0, time.monotonic() - t0, p.returncode == 0))

    try:
        for _ in range(200):
            p = subprocess.run([bins[0], "--socket", sock, "status", "web", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
            if p.returncode == 0 and json.loads(p.stdout)["sites"][0]["ready"] == 4:
                break
            time.sleep(0.05)
        pids = sorted(w["pid"] for w in json.loads(p.stdout)["sites"][0]["workers"])
        threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=status_loop)]
        for t in threads:
            t.start()
        time.sleep(3)
        base_end = time.monotonic()
        windows, took = [], []
        for i in range(a.reps):
            binary = bins[(i + 1) % 2]
            t0 = time.monotonic()
            p = subprocess.run([bins[0], "--socket", sock, "upgrade", "--binary", binary],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
            t1 = time.monotonic()
            if p.returncode != 0:
                raise RuntimeError("upgrade %d failed: %s" % (i, p.stdout))
            took.append(t1 - t0)
            windows.append((t0 - 0.2, t1 + 0.2))
            time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join()
        p = subprocess.run([bins[0], "--socket", sock, "status", "web", "--json"], stdout=subprocess.PIPE)
        after = sorted(w["pid"] for w in json.loads(p.stdout)["sites"][0]["workers"])
        same_pid = agent.poll() is None
    finally:
        stop.set()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()

    def inside(t):
        return any(lo <= t <= hi for lo, hi in windows)

    def gaps(pred):
        ts = sorted(t for t, ok in answers if ok)
        return [b - x for x, b in zip(ts, ts[1:]) if pred(b)]

    base_gap = gaps(lambda t: t <= base_end)
    up_gap = gaps(inside)
    base_st = [d for t, d, ok in statuses if t <= base_end]
    up_st = [d for t, d, ok in statuses if inside(t)]
    failed = [t for t, ok in answers if not ok]
    failed_st = [t for t, d, ok in statuses if not ok]
    print("| %d upgrades under load (8 clients, 50 ms handler) | baseline (3 s) | upgrade windows |" % a.reps)
    print("|---|---|---|")
    print("| requests answered / failed | %d / %d | %d / %d |" % (
        len([1 for t, ok in answers if ok and t <= base_end]), len([t for t in failed if t <= base_end]),
        len([1 for t, ok in answers if ok and inside(t)]), len([t for t in failed if inside(t)])))
    print("| longest gap between two answered requests | %.1f ms | %.1f ms |" % (max(base_gap) * 1000, max(up_gap) * 1000))
    print("| `status` calls, median / slowest | %.1f / %.1f ms | %.1f / %.1f ms |" % (
        statistics.median(base_st) * 1000, max(base_st) * 1000, statistics.median(up_st) * 1000, max(up_st) * 1000))
    print("| failed `status` calls | %d | %d |" % (len([t for t in failed_st if t <= base_end]), len([t for t in failed_st if inside(t)])))
    print("| `hatchery upgrade` took, median (min–max) | | %.1f ms (%.1f–%.1f) |" % (
        statistics.median(took) * 1000, min(took) * 1000, max(took) * 1000))
    print("| agent pid and worker pids unchanged | | %s |" % ("yes" if same_pid and after == pids else "NO"))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
