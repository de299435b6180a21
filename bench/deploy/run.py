#!/usr/bin/env python3
"""Deploy benchmark (issue 5): requests failed and latency during reloads, and deploy duration,
for gunicorn HUP, pm2 reload (cluster mode) and hatchery deploy, same machine, same run,
same application code (app.py, app.js). Python 3 standard library only.

Usage: bench/deploy/run.py [--duration 25] [--reloads 20] [--conns 16] [--only NAME,...]
                           [--deploy-reps 3] [--hatchery BIN] [--gunicorn BIN] [--pm2 BIN]
Everything it starts lives under a fresh /tmp/bench-deploy.* directory and is stopped on exit
(pm2 with `pm2 kill` on a private PM2_HOME); every request and command has a timeout.
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
REQ_TIMEOUT = 5.0  # a request not answered in this long counts as failed (timeout)
CMD_TIMEOUT = 120.0  # any reload/deploy command
SYSTEMS = ["gunicorn", "pm2", "hatchery-gunicorn", "hatchery-node", "hatchery-node-warm5", "hatchery-node-warm"]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env=None, timeout=CMD_TIMEOUT, check=True):
    p = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and p.returncode != 0:
        raise RuntimeError("%s exited %s:\n%s" % (" ".join(cmd), p.returncode, p.stdout[-2000:]))
    return p


def alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def wait_until(pred, timeout, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ---------------------------------------------------------------- load generator

def one_request(port):
    """A fresh connection, one GET with Connection: close, read to EOF. -> (ok, kind, body)"""
    s = socket.socket()
    s.settimeout(REQ_TIMEOUT)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
        data = b"".join(chunks)
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 ") and not head.startswith(b"HTTP/1.0 200 "):
            return False, "status:" + (head.split(b"\r\n", 1)[0].decode(errors="replace") or "empty"), b""
        return True, "ok", body
    except socket.timeout:
        return False, "timeout", b""
    except ConnectionRefusedError:
        return False, "refused", b""
    except ConnectionResetError:
        return False, "reset", b""
    except OSError as e:
        return False, "oserror:%s" % e.__class__.__name__, b""
    finally:
        s.close()


class Load:
    """`conns` threads, each a closed loop of fresh-connection requests until stop()."""

    def __init__(self, port, conns):
        self.port, self.samples, self.lock = port, [], threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(conns)]

    def start(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def loop(self):
        mine = []
        while not self.stopping.is_set():
            t = time.monotonic()
            ok, kind, body = one_request(self.port)
            mine.append((t, time.monotonic() - t, kind, body.split(b" ")[1].decode() if ok and body.count(b" ") > 1 else ""))
        with self.lock:
            self.samples.extend(mine)

    def stop(self):
        self.t1 = time.monotonic()
        self.stopping.set()
        for t in self.threads:
            t.join(REQ_TIMEOUT + 2)
        return self.samples


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    f = int(k)
    return xs[f] if f + 1 >= len(xs) else xs[f] + (xs[f + 1] - xs[f]) * (k - f)


def summarize(system, scenario, samples, t0, t1, extra):
    # Only requests started inside the window count; the window is [t0, t1).
    inside = [s for s in samples if t0 <= s[0] < t1]
    ok = [s[1] for s in inside if s[2] == "ok"]
    failed = {}
    for s in inside:
        if s[2] != "ok":
            failed[s[2]] = failed.get(s[2], 0) + 1
    dur = t1 - t0
    r = {
        "system": system, "scenario": scenario, "duration_s": round(dur, 2),
        "requests": len(inside), "failed": sum(failed.values()), "failures": failed,
        "throughput_rps": round(len(ok) / dur, 1),
        "p50_ms": round(pct(ok, 50) * 1000, 1), "p99_ms": round(pct(ok, 99) * 1000, 1),
        "max_ms": round(max(ok) * 1000, 1) if ok else None,
        "releases_seen": len({s[3] for s in inside if s[2] == "ok"}),
    }
    r.update(extra)
    print(json.dumps(r), flush=True)
    return r


# ---------------------------------------------------------------- releases

class Releases:
    """releases/rN/{app.py,app.js,RELEASE} and the `current` symlink."""

    def __init__(self, base):
        self.dir = os.path.join(base, "releases")
        self.link = os.path.join(base, "current")
        self.n = 0
        os.makedirs(self.dir)
        self.next()

    def next(self):
        self.n += 1
        d = os.path.join(self.dir, "r%d" % self.n)
        os.makedirs(d)
        for f in ("app.py", "app.js"):
            shutil.copy(os.path.join(HERE, f), d)
        with open(os.path.join(d, "RELEASE"), "w") as f:
            f.write("r%d\n" % self.n)
        tmp = self.link + ".tmp"
        os.symlink(d, tmp)
        os.replace(tmp, self.link)  # atomic repoint
        return "r%d" % self.n


# ---------------------------------------------------------------- systems

class System:
    """start(); reload() (blocking until the command returns); old_pids()/worker_pids(); stop()."""
    sync_reload = True

    def __init__(self, base, port, env, args):
        self.base, self.port, self.env, self.args = base, port, env, args
        self.rel = Releases(os.path.join(base, "app"))

    def wait_serving(self, timeout=30):
        if not wait_until(lambda: one_request(self.port)[0], timeout, 0.1):
            raise RuntimeError("%s does not answer on port %d" % (self.name, self.port))


class Gunicorn(System):
    name = "gunicorn"
    sync_reload = False  # HUP returns at once; the master replaces its workers in the background

    def start(self):
        os.makedirs(os.path.join(self.base, "gu"))
        # No --preload: HUP must re-import the app to pick up the new release (the workers
        # import it from the `current` symlink through --pythonpath).
        cmd = [self.args.gunicorn, "-w", "4", "-b", "127.0.0.1:%d" % self.port, "--pythonpath", self.rel.link,
               "--chdir", os.path.join(self.base, "gu"), "--graceful-timeout", "10", "app:app"]
        self.log = open(os.path.join(self.base, "gunicorn.log"), "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_serving()
        wait_until(lambda: len(self.worker_pids()) == 4, 30)

    def worker_pids(self):
        return children(self.proc.pid)

    def reload(self):
        self.rel.next()
        os.kill(self.proc.pid, signal.SIGHUP)
        return 0

    def stop(self):
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class Pm2(System):
    name = "pm2"

    def start(self):
        self.penv = dict(self.env, PM2_HOME=os.path.join(self.base, "pm2"))
        eco = os.path.join(self.base, "ecosystem.config.js")
        conf = {
            "apps": [{
                "name": "bench", "script": os.path.join(self.rel.link, "app.js"), "exec_mode": "cluster",
                "instances": 4, "autorestart": True, "kill_timeout": 10000, "listen_timeout": 10000,
                "env": {"PORT": str(self.port), "HOST": "127.0.0.1",
                        "APP_STARTUP_DELAY": self.env.get("APP_STARTUP_DELAY", "0")},
            }]
        }
        with open(eco, "w") as f:
            f.write("module.exports = %s;\n" % json.dumps(conf, indent=1))
        run([self.args.pm2, "start", eco], env=self.penv, timeout=60)
        self.wait_serving()

    def worker_pids(self):
        out = run([self.args.pm2, "jlist"], env=self.penv, timeout=30).stdout
        out = out[out.index("["):]
        return [p["pid"] for p in json.loads(out) if p.get("pid")]

    def reload(self):
        self.rel.next()
        return run([self.args.pm2, "reload", "bench"], env=self.penv, check=False).returncode

    def stop(self):
        if getattr(self, "penv", None):
            try:
                run([self.args.pm2, "kill"], env=self.penv, timeout=60, check=False)
            except subprocess.TimeoutExpired:
                log("pm2 kill timed out")


class Hatchery(System):
    """The adapter for hatchery: an agent (cgroup_base off) with one site; reload = repoint the
    release symlink, then `hatchery deploy SITE` (returns once the old generation has retired)."""

    def start(self):
        d = os.path.join(self.base, "hatchery")
        os.makedirs(os.path.join(d, "sites.d"))
        self.sock = os.path.join(d, "control.sock")
        with open(os.path.join(d, "hatchery.toml"), "w") as f:
            f.write('control_socket = "%s"\nstate_dir = "%s/state"\nsites_dir = "%s/sites.d"\ncgroup_base = "off"\n'
                    % (self.sock, d, d))
        cmd, workers = self.site_command()
        appenv = {"APP_STARTUP_DELAY": self.env.get("APP_STARTUP_DELAY", "0")}
        appenv.update(self.site_env())
        site = ['name = "bench"',
                "command = [%s]" % ", ".join(json.dumps(c) for c in cmd),
                "workers = %d" % workers,
                'release = "%s"' % self.rel.link,
                'workdir = "{release}"',
                "[env]"] + ['%s = "%s"' % kv for kv in sorted(appenv.items())] + [
                "[[listen]]", 'name = "http"', 'tcp = "127.0.0.1:%d"' % self.port,
                "[ready]", 'check = "%s"' % self.ready_check, 'timeout = "30s"',
                "[stop]", 'signal = "SIGTERM"', 'timeout = "10s"'] + self.site_extra()
        with open(os.path.join(d, "sites.d", "bench.toml"), "w") as f:
            f.write("\n".join(site) + "\n")
        self.log = open(os.path.join(d, "agent.log"), "w")
        self.proc = subprocess.Popen([self.args.hatchery, "agent", "--config", os.path.join(d, "hatchery.toml")],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_serving()
        wait_until(lambda: len(self.worker_pids()) == workers, 30)

    def site_extra(self):
        return []

    def ctl(self, *a, timeout=CMD_TIMEOUT):
        return run([self.args.hatchery, "--socket", self.sock] + list(a), env=self.env, timeout=timeout, check=False)

    def status(self):
        p = self.ctl("status", "bench", "--json", timeout=30)
        j = json.loads(p.stdout)
        return j["sites"][0] if "sites" in j else j

    def worker_pids(self):
        return [w["pid"] for w in self.status().get("workers", []) if w.get("pid")]

    def reload(self):
        self.rel.next()
        p = self.ctl("deploy", "bench")
        if p.returncode != 0:
            log("hatchery deploy exited %d:\n%s" % (p.returncode, p.stdout[-1500:]))
        return p.returncode

    def stop(self):
        if getattr(self, "proc", None) and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: stops every site gracefully, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class HatcheryGunicorn(Hatchery):
    name = "hatchery-gunicorn"
    ready_check = "notify"

    def site_command(self):
        # One unchanged gunicorn master with 4 sync workers per generation. --preload makes the
        # master import the app before it sends READY=1 (gunicorn sends it when the arbiter has
        # booted, before its workers are forked), so readiness covers the app's start-up.
        return [self.args.gunicorn, "--chdir", "{release}", "-w", "4", "--preload",
                "--graceful-timeout", "10", "app:app"], 1

    def site_env(self):
        return {}


class HatcheryNode(Hatchery):
    name = "hatchery-node"
    # Node has no unix datagram sockets without an addon: readiness is the agent's TCP probe,
    # which reaches the new generation's listener alone (eBPF steering's probe entry).
    ready_check = "tcp"

    def site_command(self):
        return [self.args.node, "{release}/app.js"], 4

    def site_env(self):
        return {}


class HatcheryNodeWarm(HatcheryNode):
    # The same, with deploy.warmup: every new worker answers 20 requests of "/" before the
    # flip, so its handler is compiled before clients reach it.
    name = "hatchery-node-warm"
    warmup = 20

    def site_extra(self):
        return ["[deploy]", "warmup = %d" % self.warmup]


class HatcheryNodeWarm5(HatcheryNodeWarm):
    name = "hatchery-node-warm5"
    warmup = 5


CLASSES = {"gunicorn": Gunicorn, "pm2": Pm2, "hatchery-gunicorn": HatcheryGunicorn, "hatchery-node": HatcheryNode,
           "hatchery-node-warm": HatcheryNodeWarm, "hatchery-node-warm5": HatcheryNodeWarm5}


# ---------------------------------------------------------------- scenarios

def bench_reloads(sysname, args, root):
    base = tempfile.mkdtemp(prefix=sysname + ".", dir=root)
    env = dict(os.environ, APP_STARTUP_DELAY=str(args.startup_delay))
    s = CLASSES[sysname](base, free_port(), env, args)
    out = []
    try:
        s.start()
        # warm-up, not measured
        w = Load(s.port, args.conns).start()
        time.sleep(2)
        w.stop()
        # steady state
        load = Load(s.port, args.conns).start()
        time.sleep(args.duration)
        t1 = time.monotonic()
        load.stop()
        out.append(summarize(sysname, "steady", load.samples, load.t0, t1, {"reloads": 0}))
        # reloads: one every duration/reloads seconds; a blocking command delays the next one,
        # and the window then lasts until 1 s after the last reload returned.
        interval = args.duration / args.reloads
        load = Load(s.port, args.conns).start()
        codes, took = [], []
        for i in range(args.reloads):
            due = load.t0 + 0.5 + i * interval
            time.sleep(max(0.0, due - time.monotonic()))
            c0 = time.monotonic()
            codes.append(s.reload())
            took.append(time.monotonic() - c0)
        end = max(load.t0 + args.duration, time.monotonic() + 1.0)
        time.sleep(max(0.0, end - time.monotonic()))
        t1 = time.monotonic()
        load.stop()
        out.append(summarize(sysname, "reloads", load.samples, load.t0, t1, {
            "reloads": len(codes), "startup_delay_s": args.startup_delay, "reload_failed": sum(1 for c in codes if c != 0),
            "reload_cmd_median_s": round(statistics.median(took), 2)}))
        return out
    finally:
        s.stop()


def bench_deploy_duration(sysname, args, root):
    """App takes 2 s to become ready. Per deploy: command -> first answer from the new release
    (probe loop) and -> every old worker pid gone (for hatchery: `deploy` returned)."""
    base = tempfile.mkdtemp(prefix=sysname + "-dur.", dir=root)
    env = dict(os.environ, APP_STARTUP_DELAY="2")
    s = CLASSES[sysname](base, free_port(), env, args)
    res = []
    try:
        s.start()
        for _ in range(args.deploy_reps):
            old = s.worker_pids()
            old += [c for p in old for c in children(p)]  # e.g. a gunicorn master's workers
            new_rel = "r%d" % (s.rel.n + 1)
            seen = {}
            stop_probe = threading.Event()

            def probe():
                while not stop_probe.is_set():
                    t = time.monotonic()
                    ok, kind, body = one_request(s.port)
                    if ok and body.split(b" ")[1].decode() == new_rel and "new" not in seen:
                        seen["new"] = time.monotonic()
                    if not ok:
                        seen["failed"] = seen.get("failed", 0) + 1
                    seen["max_latency"] = max(seen.get("max_latency", 0), time.monotonic() - t)
                    time.sleep(0.02)

            th = threading.Thread(target=probe, daemon=True)
            t0 = time.monotonic()
            th.start()
            code = s.reload()
            cmd_done = time.monotonic()
            wait_until(lambda: not any(alive(p) for p in old), 60)
            gone = time.monotonic()
            wait_until(lambda: "new" in seen, 30)
            stop_probe.set()
            th.join(REQ_TIMEOUT + 2)
            r = {"system": sysname, "scenario": "deploy-duration", "startup_delay_s": 2, "code": code,
                 "command_s": round(cmd_done - t0, 2), "old_retired_s": round(gone - t0, 2),
                 "new_serving_s": round(seen["new"] - t0, 2) if "new" in seen else None,
                 "probe_failed": seen.get("failed", 0), "probe_max_ms": round(seen.get("max_latency", 0) * 1000)}
            print(json.dumps(r), flush=True)
            res.append(r)
            time.sleep(1)
        return res
    finally:
        s.stop()


def table(results, durations):
    rows = ["| system | scenario | requests | failed | throughput (req/s) | p50 ms | p99 ms | max ms | throughput vs steady | p99 vs steady | reload cmd (median s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    steady = {r["system"]: r for r in results if r["scenario"] == "steady"}
    for r in results:
        st = steady.get(r["system"])
        if r["scenario"] == "reloads" and st:
            ratio_t = "%+.0f %%" % ((r["throughput_rps"] / st["throughput_rps"] - 1) * 100)
            ratio_p = "%.2f×" % (r["p99_ms"] / st["p99_ms"])
            scen = "%d reloads in %.1f s" % (r["reloads"], r["duration_s"])
            cmd = "%.2f" % r["reload_cmd_median_s"]
        else:
            ratio_t = ratio_p = cmd = ""
            scen = "steady %.1f s" % r["duration_s"]
        fails = str(r["failed"]) + (" " + json.dumps(r["failures"]) if r["failed"] else "")
        rows.append("| %s | %s | %d | %s | %.1f | %.1f | %.1f | %.1f | %s | %s | %s |" % (
            r["system"], scen, r["requests"], fails, r["throughput_rps"], r["p50_ms"], r["p99_ms"],
            r["max_ms"] or 0, ratio_t, ratio_p, cmd))
    if durations:
        rows += ["", "| system (app ready after 2 s) | command returned (s) | old generation retired (s) | new release first answered (s) | probe failures / max latency |",
                 "|---|---|---|---|---|"]
        by = {}
        for d in durations:
            by.setdefault(d["system"], []).append(d)
        for name, ds in by.items():
            def m(k):
                v = [d[k] for d in ds if d[k] is not None]
                return "%.2f (%s)" % (statistics.median(v), ", ".join("%.2f" % x for x in v)) if v else "n/a"
            rows.append("| %s | %s | %s | %s | %d / %d ms |" % (name, m("command_s"), m("old_retired_s"), m("new_serving_s"),
                                                              sum(d["probe_failed"] for d in ds), max(d["probe_max_ms"] for d in ds)))
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=25.0)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--deploy-reps", type=int, default=3)
    ap.add_argument("--startup-delay", type=float, default=0.0,
                    help="the app's start-up time (s) in the steady/reload scenarios (default 0)")
    ap.add_argument("--only", default=",".join(SYSTEMS))
    ap.add_argument("--skip-duration", action="store_true")
    ap.add_argument("--hatchery", default=os.path.join(REPO, "target/release/hatchery"))
    ap.add_argument("--gunicorn", default="/tmp/bench-deploy-venv/bin/gunicorn")
    ap.add_argument("--pm2", default=shutil.which("pm2") or "/usr/bin/pm2")
    ap.add_argument("--node", default=shutil.which("node") or "/usr/bin/node")
    args = ap.parse_args()
    systems = [x for x in args.only.split(",") if x]
    for x in systems:
        if x not in CLASSES:
            ap.error("unknown system %s (known: %s)" % (x, ", ".join(SYSTEMS)))
    root = tempfile.mkdtemp(prefix="bench-deploy.", dir="/tmp")
    log("work dir", root)

    def on_signal(sig, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_signal)
    results, durations = [], []
    try:
        for x in systems:
            log("reloads:", x)
            results += bench_reloads(x, args, root)
        if not args.skip_duration:
            for x in systems:
                log("deploy duration:", x)
                durations += bench_deploy_duration(x, args, root)
    finally:
        print("\n" + table(results, durations), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
