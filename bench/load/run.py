#!/usr/bin/env python3
"""Load-following benchmark (issue 13): one WSGI app whose handler takes 50 ms, served by
each system under the same open-loop load profile (idle, ramp, steady, burst at 3x, idle),
compared on latency, failures, worker-seconds and how fast the workers follow the burst.

Systems (``--only`` picks some, comma-separated; they run one after another):

- ``hatchery-fixed-min``: a Hatchery site, exec mode, ``workers = 1``;
- ``hatchery-fixed-max``: the same, ``workers = 24``;
- ``hatchery-load``: ``workers = "auto"`` (1..24) with ``[scale] by = "load"``, workers
  sending BUSY reports (``--busy-reports``);
- ``hatchery-load-zygote``: the same in ``mode = "zygote"``;
- ``uwsgi-cheaper``: uWSGI, ``--processes 24 --cheaper 1 --cheaper-initial 1``, the
  ``busyness`` algorithm; ``uwsgi-cheaper-spare``: the same with ``spare``.

Every Hatchery worker runs ``python3 -m hatchery_zygote --threads 1 app:app`` (the
repo's helper, a sync worker: one request at a time). uWSGI runs one process per worker,
one thread each, serving HTTP itself (``--http-socket``, no router).

The client is this process: asyncio, standard library only, one TCP connection per
request, each request started at its scheduled time whatever the answers (open loop),
5 s per request (a timeout, a connection error or a status other than 200 is a failed
request). Latency is from the scheduled start to the end of the answer. A sampler in a
forked process counts the live worker processes and their RSS every 100 ms from /proc
(Hatchery: the agent's children whose cgroup is a worker leaf ``w-K``; uWSGI: the
master's children), never from the system's own claims.

Usage: python3 bench/load/run.py [--only a,b] [--profile smoke|full] [--out FILE]
"""

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SITE = "load"
SYSTEMS = ["hatchery-fixed-min", "hatchery-fixed-max", "hatchery-load", "hatchery-load-zygote",
           "uwsgi-cheaper", "uwsgi-cheaper-spare"]
REQUEST_TIMEOUT_S = 5.0
SAMPLE_S = 0.1
BURST_WORKERS = 15  # 300 req/s x 50 ms

# (phase, seconds, rate at start, rate at end), rates in requests per second.
PROFILES = {
    "full": [("idle", 10, 0.5, 0.5), ("ramp", 20, 20, 100), ("steady", 15, 100, 100),
             ("burst", 10, 300, 300), ("idle-after", 40, 0.5, 0.5)],
    "smoke": [("idle", 2, 1, 1), ("ramp", 4, 20, 100), ("steady", 3, 100, 100),
              ("burst", 3, 300, 300), ("idle-after", 4, 1, 1)],
}

# The agent's control protocol and small helpers, shared with the zygote benchmark.
_spec = importlib.util.spec_from_file_location("zygote_bench", os.path.join(REPO, "bench", "zygote", "run.py"))
zb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zb)
BenchError, Control, children, free_port, wait_for = (
    zb.BenchError, zb.Control, zb.children, zb.free_port, zb.wait_for)

T_START = time.monotonic()


def log(msg):
    print("[%7.1f] %s" % (time.monotonic() - T_START, msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- schedule and client


def schedule(profile):
    """[(offset s, phase)]: each request's start, the gap being 1/rate at that moment."""
    out, t0 = [], 0.0
    for phase, seconds, r0, r1 in profile:
        t = 0.0
        while t < seconds:
            out.append((t0 + t, phase))
            rate = r0 + (r1 - r0) * t / seconds
            t += 1.0 / rate
        t0 += seconds
    return out


async def one_request(port, started_at):
    """(ok, latency s from ``started_at``, error text)."""
    writer = None
    try:
        async def go():
            nonlocal writer
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            return await reader.read()  # to end of file: the server closes

        data = await asyncio.wait_for(go(), REQUEST_TIMEOUT_S)
        if not data.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
            return False, time.monotonic() - started_at, "answer %r" % data[:40]
        return True, time.monotonic() - started_at, None
    except asyncio.TimeoutError:
        return False, time.monotonic() - started_at, "timeout"
    except OSError as e:
        return False, time.monotonic() - started_at, type(e).__name__
    finally:
        if writer is not None:
            writer.close()


async def drive(port, plan, t0):
    """Starts every request of ``plan`` at t0 + offset; returns [(offset, phase, ok,
    latency, error, lag)]."""
    results = []

    async def run(offset, phase):
        at = t0 + offset
        lag = time.monotonic() - at
        ok, latency, err = await one_request(port, at)
        results.append((offset, phase, ok, latency, err, lag))

    tasks = []
    for offset, phase in plan:
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run(offset, phase)))
    await asyncio.gather(*tasks)
    return results


# ---------------------------------------------------------------- sampling /proc

WORKER_LEAF = re.compile(r"/w-\d+$")


def cgroup2_path(pid):
    with open("/proc/%d/cgroup" % pid) as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return ""


def rss_kb(pid):
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def live_workers(kind, root):
    """The worker pids now: Hatchery's are the agent's children in a ``w-K`` leaf (not
    the zygote, not a spare forked ahead); uWSGI's are the master's children."""
    out = []
    for pid in children(root):
        try:
            if kind == "uwsgi" or WORKER_LEAF.search(cgroup2_path(pid)):
                out.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def sampler(kind, root, t0, conn):
    """In a forked process: every SAMPLE_S, (t - t0, workers, sum of their RSS kB), until
    the parent sends anything; then sends the samples back."""
    samples = []
    next_at = time.monotonic()
    while not conn.poll(max(0.0, next_at - time.monotonic())):
        next_at += SAMPLE_S
        t = time.monotonic()
        try:
            pids = live_workers(kind, root)
        except FileNotFoundError:
            pids = []
        rss = 0
        for p in pids:
            try:
                rss += rss_kb(p)
            except (FileNotFoundError, ProcessLookupError):
                pass
        samples.append((round(t - t0, 3), len(pids), rss))
    conn.send(samples)


# ---------------------------------------------------------------- systems


class Hatchery:
    def __init__(self, name, args, work, port):
        self.name, self.args, self.work, self.port = name, args, work, port
        self.kind = "hatchery"
        self.ctl = Control(os.path.join(work, "control.sock"))
        self.agent = None
        load = name.startswith("hatchery-load")
        cmd = ["python3", "-m", "hatchery_zygote", "--threads", "1"]
        cmd += ["--busy-reports"] if load else []
        cmd += ["app:app"]
        lines = [
            'name = "%s"' % SITE,
            "command = [%s]" % ", ".join(json.dumps(c) for c in cmd),
            'mode = "%s"' % ("zygote" if name.endswith("-zygote") else "exec"),
            'workdir = "%s"' % work,
        ]
        if load:
            self.initial = 1
            lines += ['workers = "auto"', "workers_min = 1", "workers_max = 24",
                      'memory = "2G"', 'worker_memory = "60M"']
        else:
            self.initial = 1 if name == "hatchery-fixed-min" else 24
            lines += ["workers = %d" % self.initial]
        lines += ["[env]", 'PYTHONPATH = "%s"' % os.path.join(REPO, "zygote", "python"),
                  "[[listen]]", 'tcp = "127.0.0.1:%d"' % port,
                  "[ready]", 'check = "notify"', 'timeout = "30s"',
                  "[stop]", 'timeout = "10s"']
        if load:
            lines += ["[scale]", 'by = "load"', "target = %s" % (args.scale_target or "0.7")]
            if args.scale_interval:
                lines += ['interval = "%s"' % args.scale_interval]
        self.site = "\n".join(lines) + "\n"
        self.config = (
            "python3 -m hatchery_zygote --threads 1%s app:app; site file:\n%s"
            % (" --busy-reports" if load else "", self.site))

    def start(self):
        os.makedirs(os.path.join(self.work, "sites.d"))
        with open(os.path.join(self.work, "hatchery.toml"), "w") as f:
            f.write('control_socket = "%s/control.sock"\nstate_dir = "%s/state"\n'
                    'sites_dir = "%s/sites.d"\n' % ((self.work,) * 3))
        with open(os.path.join(self.work, "sites.d", SITE + ".toml"), "w") as f:
            f.write(self.site)
        self.log_path = os.path.join(self.work, "agent.log")
        self.log_file = open(self.log_path, "w")
        self.agent = subprocess.Popen(
            [self.args.hatchery, "agent", "--config", os.path.join(self.work, "hatchery.toml")],
            stdout=self.log_file, stderr=subprocess.STDOUT)

        def status():
            if self.agent.poll() is not None:
                raise BenchError("the agent refused the configuration or exited (code %s): %s"
                                 % (self.agent.returncode, tail(self.log_path)))
            try:
                final, _ = self.ctl.request({"cmd": "status", "site": SITE}, timeout=10)
            except OSError:
                return None
            if "error" in final:
                raise BenchError("status: %s; agent log: %s" % (final["error"], tail(self.log_path)))
            s = final["ok"]["sites"][0]
            if s.get("error") or s.get("state") == "failed":
                raise BenchError("the site did not start: %s; agent log: %s"
                                 % (json.dumps(s)[:400], tail(self.log_path)))
            return s

        wait_for("%d ready workers" % self.initial,
                 lambda: (status() or {}).get("ready", 0) >= self.initial, 120, 0.05)
        return self.agent.pid

    def stop(self):
        if self.agent is None:
            return
        try:
            if self.agent.poll() is None:
                self.ctl.request({"cmd": "stop", "site": SITE}, timeout=60)
        except (OSError, BenchError) as e:
            log("%s: stop: %s" % (self.name, e))
        finally:
            end_process(self.agent)
            self.log_file.close()


class Uwsgi:
    def __init__(self, name, args, work, port):
        self.name, self.args, self.work, self.port = name, args, work, port
        self.kind = "uwsgi"
        self.proc = None
        self.algo = "spare" if name.endswith("-spare") else "busyness"
        self.cmd = [os.path.join(args.venv, "bin", "uwsgi"),
                    "--http-socket", "127.0.0.1:%d" % port, "--master",
                    "--processes", "24", "--cheaper", "1", "--cheaper-initial", "1",
                    "--cheaper-algo", self.algo, "--threads", "1", "--listen", "1024",
                    "--chdir", work, "--wsgi-file", os.path.join(work, "app.py"),
                    "--callable", "app", "--need-app", "--die-on-term",
                    "--stats", os.path.join(work, "stats.sock")]
        self.config = " ".join(self.cmd)

    def start(self):
        self.log_path = os.path.join(self.work, "uwsgi.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=self.work, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise BenchError("uwsgi exited with %s: %s" % (self.proc.returncode, tail(self.log_path)))
            try:
                return zb.get(self.port, timeout=2)[0] == 200
            except OSError:
                return False

        wait_for("uwsgi answering", up, 60, 0.05)
        return self.proc.pid

    def stop(self):
        if self.proc is not None:
            end_process(self.proc)
            self.log_file.close()


def end_process(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tail(path, n=6):
    try:
        with open(path, errors="replace") as f:
            lines = [ANSI.sub("", line).strip() for line in f.readlines()[-n:]]
            return " | ".join(lines)
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- one system


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latency_stats(rows):
    ms = [r[3] * 1000 for r in rows if r[2]]
    return {"requests": len(rows), "failed": sum(1 for r in rows if not r[2]),
            "p50_ms": _r(pct(ms, 0.50)), "p99_ms": _r(pct(ms, 0.99)),
            "max_ms": _r(max(ms) if ms else None)}


def _r(x):
    return None if x is None else round(x, 1)


def run_system(name, args, profile, work):
    port = free_port()
    os.makedirs(work)
    shutil.copy(os.path.join(HERE, "app.py"), work)
    system = (Uwsgi if name.startswith("uwsgi") else Hatchery)(name, args, work, port)
    r = {"system": name, "config": system.config}
    try:
        log("%s: starting" % name)
        root = system.start()
        plan = schedule(profile)
        burst_at = sum(p[1] for p in profile[:[p[0] for p in profile].index("burst")])
        t0 = time.monotonic() + 0.5
        parent_end, child_end = multiprocessing.Pipe()
        sampler_proc = multiprocessing.Process(target=sampler, args=(system.kind, root, t0, child_end))
        sampler_proc.start()
        log("%s: %d requests over %.0f s" % (name, len(plan), sum(p[1] for p in profile)))
        rows = asyncio.run(drive(port, plan, t0))
        length = sum(p[1] for p in profile)
        # The last idle request may come and go before the profile ends: sample to its end.
        time.sleep(max(0.0, t0 + length + SAMPLE_S - time.monotonic()))
        parent_end.send("stop")
        samples = parent_end.recv()
        sampler_proc.join()
        rows.sort()
        # The same window for every system: the profile's length (a system that leaves
        # requests to time out is not charged for the drain).
        window = [s for s in samples if 0 <= s[0] < length]
        # Each sample holds until the next (the last one until the profile's end): the
        # sampler's own delays do not change the integral.
        spans = [b[0] - a[0] for a, b in zip(window, window[1:])] + [length - window[-1][0]]
        ws = sum(s[1] * d for s, d in zip(window, spans))
        rss_mbs = sum(s[2] * d for s, d in zip(window, spans)) / 1024
        reached = [s[0] - burst_at for s in window if s[0] >= burst_at and s[1] >= BURST_WORKERS]
        errors = {}
        for row in rows:
            if not row[2]:
                errors[row[4]] = errors.get(row[4], 0) + 1
        r.update({
            "all": latency_stats(rows),
            "burst": latency_stats([x for x in rows if x[1] == "burst"]),
            "errors": errors,
            "client_max_lag_ms": _r(max(x[5] for x in rows) * 1000),
            "worker_seconds": round(ws, 1),
            "rss_mb_seconds": round(rss_mbs, 0),
            "max_workers": max(s[1] for s in window),
            "workers_at_end": window[-1][1],
            "to_15_workers_s": round(max(0.0, reached[0]), 1) if reached else "never",
            "window_s": round(window[-1][0], 1),
            "samples": [[s[0], s[1], s[2]] for s in window],
        })
        log("%s: %s" % (name, {k: v for k, v in r.items() if k not in ("samples", "config")}))
    except BenchError as e:
        r["error"] = str(e)
        log("%s: error: %s" % (name, e))
    finally:
        system.stop()
    return r


# ---------------------------------------------------------------- report


def table(results):
    head = ("system", "all p50/p99/max ms", "burst p50/p99/max ms", "failed (burst)",
            "worker-s", "RSS MB-s", "max workers", "workers at end", "to 15 workers s")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            out.append("| %s | error: %s |%s" % (r["system"], r["error"][:300], " |" * (len(head) - 2)))
            continue
        a, b = r["all"], r["burst"]
        ms = ["-" if x is None else "%g" % x for x in
              (a["p50_ms"], a["p99_ms"], a["max_ms"], b["p50_ms"], b["p99_ms"], b["max_ms"])]
        out.append("| %s | %s / %s / %s | %s / %s / %s | %d (%d) | %.0f | %.0f | %d | %d | %s |" % (
            (r["system"],) + tuple(ms) + (a["failed"], b["failed"], r["worker_seconds"],
                                          r["rss_mb_seconds"], r["max_workers"],
                                          r["workers_at_end"], r["to_15_workers_s"])))
    return "\n".join(out)


def main():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    cache = os.path.join(target, "load-bench")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="hatchery-fixed-min,hatchery-fixed-max,hatchery-load,"
                    "hatchery-load-zygote,uwsgi-cheaper",
                    help="comma-separated systems of: %s" % ", ".join(SYSTEMS))
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--out", default=None, help="JSON results (default WORK/results-PROFILE.json)")
    ap.add_argument("--work", default=os.path.join(cache, "run"), help="scratch (emptied first)")
    ap.add_argument("--venv", default=os.path.join(cache, "venv"), help="the venv with uwsgi")
    ap.add_argument("--scale-target", default=None,
                    help="hatchery-load*: [scale] target (default 0.7)")
    ap.add_argument("--scale-interval", default=None,
                    help="hatchery-load*: [scale] interval (default: the agent's)")
    ap.add_argument("--hatchery", default=os.environ.get("HATCHERY_BIN")
                    or os.path.join(target, "release", "hatchery"))
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SYSTEMS]
    if bad:
        ap.error("--only: unknown system(s) %s; accepted: %s" % (bad, ", ".join(SYSTEMS)))
    if any(s.startswith("hatchery") for s in only) and not os.access(args.hatchery, os.X_OK):
        ap.error("--hatchery: %s is not an executable (cargo build --release)" % args.hatchery)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # up to 1500 requests in flight
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    profile = PROFILES[args.profile]
    uwsgi = os.path.join(args.venv, "bin", "uwsgi")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python3", "bench/load/run.py"] + sys.argv[1:]),
        "profile": args.profile,
        "phases": [{"phase": p, "seconds": s, "rate_from": a, "rate_to": b} for p, s, a, b in profile],
        "requests": len(schedule(profile)),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "hatchery": (subprocess.run([args.hatchery, "--version"], capture_output=True,
                                    text=True).stdout.strip() if os.access(args.hatchery, os.X_OK) else None),
        "uwsgi": (subprocess.run([uwsgi, "--version"], capture_output=True, text=True).stdout.strip()
                  if os.access(uwsgi, os.X_OK) else None),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    results = []
    for name in only:
        if name.startswith("uwsgi") and not os.access(uwsgi, os.X_OK):
            results.append({"system": name, "error": "skipped: no uwsgi at %s (python3 -m venv %s "
                            "&& %s/bin/pip install uwsgi)" % (uwsgi, args.venv, args.venv)})
            continue
        results.append(run_system(name, args, profile, os.path.join(args.work, name)))
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta["seconds"] = round(time.monotonic() - T_START, 1)
    out = args.out or os.path.join(args.work, "results-%s.json" % args.profile)
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = "%s\n\n```\n%s\n```\n" % (table(results), meta["command"])
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    print("results: %s" % out)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
