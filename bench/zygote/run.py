#!/usr/bin/env python3
"""Zygote-mode benchmark (issue 12): one real Flask app that imports pandas and numpy,
served by 16 workers under four servers, compared on per-worker memory, the time to start
one more worker, and the time to deploy an app whose import takes 3 s.

Variants (``--only`` picks some, comma-separated):

- ``zygote``: a Hatchery site with ``mode = "zygote"``, command
  ``python -m hatchery_zygote app:app`` (the repo's ``zygote/python`` on ``PYTHONPATH``);
- ``zygote-preview``: the same zygote command, with this driver playing the agent's side
  of the protocol (``zygote_preview.py``): the Python side's figures until the agent
  starts zygotes;
- ``exec``: a Hatchery site in exec mode, each worker a fresh Python running
  ``exec_worker.py app:app`` (the same wsgiref server on fd 3, READY=1 on NOTIFY_SOCKET);
- ``gunicorn``: ``gunicorn -w 16`` (sync workers), no ``--preload``;
- ``gunicorn-preload``: the same with ``--preload``.

Per variant, in order: start the 16 workers and wait until they are all ready; read their
memory before any request; warm each
worker with HTTP requests on loopback until every worker answered ``--warm`` of them
(bounded in count and time); read ``/proc/<pid>/smaps_rollup`` of each worker (USS =
Private_Clean + Private_Dirty, and Pss) and of the zygote or master; time one more worker
(``scale 17`` until its ready event, or gunicorn's TTIN until the new worker has loaded the
app), ``--reps`` times; then deploy a release whose import takes ``--import-seconds``
(Hatchery: ``deploy``; gunicorn: repoint the release symlink and HUP) and show which
release answers afterwards.

Python standard library only for this driver; the app and gunicorn live in a venv it
creates (``--venv``, default ``$CARGO_TARGET_DIR/zygote-bench/venv``). Results go to stdout
as a table and to ``--out`` as JSON.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the benchmark's files
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VARIANTS = ["zygote", "zygote-preview", "exec", "gunicorn", "gunicorn-preload"]
PACKAGES = ["flask", "pandas", "numpy", "gunicorn"]
SITE = "z"


class BenchError(Exception):
    """A variant could not be measured; the message says what was attempted."""


def log(msg):
    print("[%7.1f] %s" % (time.monotonic() - T_START, msg), file=sys.stderr, flush=True)


T_START = time.monotonic()


def wait_for(what, pred, deadline_s, interval=0.02):
    """Polls ``pred`` until it returns a true value or ``deadline_s`` passes."""
    end = time.monotonic() + deadline_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise BenchError("timed out after %.0f s waiting for %s" % (deadline_s, what))
        time.sleep(interval)


# ---------------------------------------------------------------- venv and releases


def ensure_venv(venv):
    py = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".zbench-packages")
    want = " ".join(PACKAGES)
    if not (os.path.exists(marker) and open(marker).read().strip() == want):
        log("creating the venv %s (%s)" % (venv, want))
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q"] + PACKAGES, check=True)
        with open(marker, "w") as f:
            f.write(want + "\n")
    out = subprocess.run(
        [py, "-c", "import importlib.metadata as m, sys; print(sys.version.split()[0], "
         + ", ".join("'%s', m.version('%s')" % (p, p) for p in PACKAGES) + ")"],
        check=True, capture_output=True, text=True).stdout.split()
    return py, "python " + out[0] + ", " + ", ".join(
        "%s %s" % (out[i], out[i + 1]) for i in range(1, len(out), 2))


def make_release(work, name, import_seconds=None):
    d = os.path.join(work, "releases", name)
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(HERE, "appsrc", "app.py"), d)
    with open(os.path.join(d, "RELEASE"), "w") as f:
        f.write(name + "\n")
    if import_seconds:
        with open(os.path.join(d, "IMPORT_SECONDS"), "w") as f:
            f.write("%s\n" % import_seconds)
    return d


def point(work, name):
    """Repoints ``work/current`` at releases/name atomically (rename over the link)."""
    tmp = os.path.join(work, "current.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join("releases", name), tmp)
    os.replace(tmp, os.path.join(work, "current"))


def import_time(py, release):
    """Wall time of ``import app`` in one fresh Python on an idle machine (seconds)."""
    t0 = time.monotonic()
    subprocess.run([py, "-c", "import app"], cwd=release, check=True)
    return time.monotonic() - t0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- HTTP load


def get(port, path="/", timeout=5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def parse_body(body):
    """(release, pid) from ``release rN pid P ...``."""
    parts = body.split()
    return parts[1], int(parts[3])


def warm(port, pids, per_worker, max_requests, max_seconds, clients=16):
    """Requests on fresh connections from ``clients`` threads until every pid in ``pids``
    answered ``per_worker`` times, or ``max_requests`` were sent, or ``max_seconds``
    passed. Returns the counts per pid and the totals."""
    counts = {p: 0 for p in pids}
    lock = threading.Lock()
    state = {"sent": 0, "errors": 0, "other": 0, "first_error": None}
    end = time.monotonic() + max_seconds

    def done():
        return all(c >= per_worker for c in counts.values())

    def client():
        while True:
            with lock:
                if done() or state["sent"] >= max_requests or time.monotonic() > end:
                    return
                state["sent"] += 1
            try:
                status, body = get(port)
                if status != 200:
                    raise BenchError("status %d: %s" % (status, body[:100]))
                _, pid = parse_body(body)
                with lock:
                    if pid in counts:
                        counts[pid] += 1
                    else:
                        state["other"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or repr(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests": state["sent"],
        "errors": state["errors"],
        "first_error": state["first_error"],
        "answered_by_others": state["other"],
        "workers_warmed": sum(1 for c in counts.values() if c >= per_worker),
        "min_per_worker": min(counts.values()) if counts else 0,
        "seconds": round(time.monotonic() - t0, 2),
    }


def releases_answering(port, n=32):
    seen = {}
    for _ in range(n):
        try:
            _, body = get(port)
            rel, _ = parse_body(body)
        except Exception as e:  # noqa: BLE001 - reported as what answered
            rel = "error: %r" % e
        seen[rel] = seen.get(rel, 0) + 1
    return seen


# ---------------------------------------------------------------- memory


def smaps(pid):
    v = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                v[parts[0][:-1]] = int(parts[1])
    return {"uss_kb": v["Private_Clean"] + v["Private_Dirty"], "pss_kb": v["Pss"],
            "rss_kb": v["Rss"]}


def children(pid):
    out = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def memory(workers, extra):
    """Per-worker figures and the total PSS of workers plus ``extra`` (zygote, master)."""
    w = [smaps(p) for p in workers]
    e = {name: smaps(p) for name, p in extra.items()}
    return {
        "workers": len(w),
        "median_uss_mb": round(statistics.median(x["uss_kb"] for x in w) / 1024, 1),
        "median_pss_mb": round(statistics.median(x["pss_kb"] for x in w) / 1024, 1),
        "median_rss_mb": round(statistics.median(x["rss_kb"] for x in w) / 1024, 1),
        "extra": {k: {kk[:-3] + "_mb": round(vv / 1024, 1) for kk, vv in v.items()}
                  for k, v in e.items()},
        "total_pss_mb": round((sum(x["pss_kb"] for x in w)
                               + sum(v["pss_kb"] for v in e.values())) / 1024, 1),
    }


# ---------------------------------------------------------------- Hatchery


class Control:
    """The agent's control protocol: one JSON request per connection, progress lines
    ``{"event": ...}`` and a final ``{"ok": ...}`` or ``{"error": ...}``."""

    def __init__(self, path):
        self.path = path

    def request(self, obj, timeout=300):
        """Returns (final, [(monotonic time, event text)]), the time taken at each line."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.path)
        try:
            s.sendall((json.dumps(obj) + "\n").encode())
            events = []
            for line in s.makefile("r", encoding="utf-8"):
                t = time.monotonic()
                m = json.loads(line)
                if "event" in m:
                    events.append((t, m["event"]))
                elif "ok" in m or "error" in m:
                    return m, events
            raise BenchError("agent closed the control connection during %s" % obj["cmd"])
        finally:
            s.close()

    def status(self):
        final, _ = self.request({"cmd": "status", "site": SITE}, timeout=10)
        if "error" in final:
            raise BenchError("status: %s" % final["error"].get("message"))
        return final["ok"]["sites"][0]


class HatcheryRun:
    def __init__(self, args, py, mode, work, port):
        self.args, self.py, self.mode, self.work, self.port = args, py, mode, work, port
        self.agent = None
        self.ctl = Control(os.path.join(work, "control.sock"))

    def write_config(self):
        os.makedirs(os.path.join(self.work, "sites.d"), exist_ok=True)
        with open(os.path.join(self.work, "hatchery.toml"), "w") as f:
            f.write('control_socket = "%s/control.sock"\nstate_dir = "%s/state"\n'
                    'sites_dir = "%s/sites.d"\n' % ((self.work,) * 3))
        if self.mode == "zygote":
            cmd = [self.py, "-m", "hatchery_zygote", "app:app"]
        else:
            cmd = [self.py, os.path.join(HERE, "exec_worker.py"), "app:app"]
        cmd += threads_args(self.args)
        site = "\n".join([
            'name = "%s"' % SITE,
            "command = [%s]" % ", ".join(json.dumps(c) for c in cmd),
            'mode = "%s"' % self.mode,
            "workers = %d" % self.args.workers,
            'release = "%s/current"' % self.work,
            'workdir = "{release}"',
            "[env]",
            'PYTHONPATH = "%s"' % os.path.join(REPO, "zygote", "python"),
            "[[listen]]",
            'tcp = "127.0.0.1:%d"' % self.port,
            "[ready]",
            'check = "notify"',
            'timeout = "180s"',
            "[stop]",
            'timeout = "10s"',
            "[deploy]",
            'probation = "%s"' % self.args.probation,
            "",
        ])
        with open(os.path.join(self.work, "sites.d", SITE + ".toml"), "w") as f:
            f.write(site)

    def start(self):
        self.write_config()
        self.agent_log = open(os.path.join(self.work, "agent.log"), "w")
        t0 = time.monotonic()
        self.agent = subprocess.Popen(
            [self.args.hatchery, "agent", "--config", os.path.join(self.work, "hatchery.toml")],
            stdout=self.agent_log, stderr=subprocess.STDOUT)

        def up():
            if self.agent.poll() is not None:
                raise BenchError("the agent exited with %s (see %s/agent.log)"
                                 % (self.agent.returncode, self.work))
            try:
                return self.ctl.status()
            except (OSError, BenchError):
                return None

        wait_for("the agent's control socket", up, 10)

        def ready():
            s = up()
            if s and s.get("error"):
                raise BenchError("the agent did not start the site: %s" % s["error"])
            if s and s["state"] == "failed":
                raise BenchError("the site failed: %s" % json.dumps(s)[:500])
            return s and s["ready"] >= self.args.workers
        wait_for("%d ready workers" % self.args.workers, ready, 300, 0.05)
        return time.monotonic() - t0

    def worker_pids(self):
        return [w["pid"] for w in self.ctl.status()["workers"] if w.get("pid")]

    def extra_pids(self, workers):
        """The zygote(s): the agent's children that are not workers."""
        out = {"agent": self.agent.pid}
        zygotes = [c for c in children(self.agent.pid)
                   if c not in workers and "hatchery_zygote" in cmdline(c)]
        for i, p in enumerate(zygotes):
            out["zygote" if i == 0 else "zygote-%d" % i] = p
        return out

    def wait_spare(self, slot, timeout=3.0):
        """Zygote mode: waits (bounded) until the agent is done with the last scale down,
        i.e. until the zygote's spare waits in worker ``slot``'s leaf (``status``:
        ``generations[].zygote.spares``), so that the scale up is timed from an idle
        agent; whether it came. Exec mode has no spare: False at once."""
        if self.mode != "zygote":
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for g in self.ctl.status().get("generations", []):
                spares = (g.get("zygote") or {}).get("spares") or []
                if any(x.get("slot") == slot for x in spares):
                    return True
            time.sleep(0.01)
        log("no spare for worker %d within %.0f s: timing the scale up anyway" % (slot, timeout))
        return False

    def one_more_worker(self):
        """scale N+1 once the agent is idle (``wait_spare``): the time from the request to
        the new worker's ready event, and to the command's answer (after ready.settle);
        then scale back to N."""
        n = self.args.workers
        self.wait_spare(n)
        t0 = time.monotonic()
        final, events = self.ctl.request({"cmd": "scale", "site": SITE, "workers": n + 1})
        t_end = time.monotonic()
        if "error" in final:
            raise BenchError("scale %d: %s" % (n + 1, final["error"]))
        # "w-16 ready" today; tolerant of a pid or a generation in the text.
        ready = [t for t, e in events
                 if ("w-%d " % n) in (e + " ") and "ready" in e and "not ready" not in e]
        if not ready:
            raise BenchError("scale %d: no ready event for w-%d in %s" % (n + 1, n, events))
        back, _ = self.ctl.request({"cmd": "scale", "site": SITE, "workers": n})
        if "error" in back:
            raise BenchError("scale %d: %s" % (n, back["error"]))
        return (ready[0] - t0) * 1000, (t_end - t0) * 1000

    def deploy(self, release):
        point(self.work, release)
        t0 = time.monotonic()
        final, events = self.ctl.request({"cmd": "deploy", "site": SITE})
        t_end = time.monotonic()
        if "error" in final:
            raise BenchError("deploy: %s; events: %s" % (final["error"], events[-5:]))

        def at(word):
            ts = [t for t, e in events if word in e]
            return round(ts[0] - t0, 2) if ts else None
        return {
            "release": release,
            "wall_s": round(t_end - t0, 2),
            "all_ready_s": at("workers ready; probation"),
            "flipped_s": at("serves: new connections go to it"),
            "agent_duration_ms": final["ok"].get("duration_ms"),
            "answers_after": releases_answering(self.port),
        }

    def stop(self):
        if self.agent is None:
            return
        try:
            if self.agent.poll() is None:
                self.ctl.request({"cmd": "stop", "site": SITE}, timeout=60)
        except (OSError, BenchError) as e:
            log("stop: %s" % e)
        finally:
            if self.agent.poll() is None:
                self.agent.send_signal(signal.SIGTERM)
                try:
                    self.agent.wait(30)
                except subprocess.TimeoutExpired:
                    self.agent.kill()
                    self.agent.wait()
            self.agent_log.close()


def run_hatchery(args, py, mode, work):
    port = free_port()
    r = {"variant": mode, "server": "hatchery %s mode%s" % (mode, server_shape(args))}
    h = HatcheryRun(args, py, mode, work, port)
    try:
        log("%s: starting the agent with %d workers" % (mode, args.workers))
        r["cold_start_16_s"] = round(h.start(), 2)
        pids = h.worker_pids()
        log("%s: %d workers ready in %.1f s; warming" % (mode, len(pids), r["cold_start_16_s"]))
        r["memory_before_requests"] = memory(pids, {})
        r["warm"] = warm(port, pids, args.warm, args.warm_max_requests, args.warm_max_seconds)
        extra = h.extra_pids(pids)
        if mode == "zygote" and "zygote" not in extra:
            r["note"] = ("no zygote found among the agent's children: total PSS is the "
                         "workers' and the agent's only")
        r["memory"] = memory(pids, extra)
        log("%s: memory %s" % (mode, r["memory"]))
        ready_ms, cmd_ms = [], []
        for _ in range(args.reps):
            a, b = h.one_more_worker()
            ready_ms.append(a)
            cmd_ms.append(b)
        r["one_worker"] = {
            "how": "scale %d -> %d over the control socket: request to the new worker's ready "
                   "event (median of %d; the command returns after ready.settle)"
                   % (args.workers, args.workers + 1, args.reps),
            "median_ms": round(statistics.median(ready_ms), 1),
            "all_ms": [round(x, 1) for x in ready_ms],
            "command_median_ms": round(statistics.median(cmd_ms), 1),
        }
        log("%s: one worker %s" % (mode, r["one_worker"]))
        r["deploys"] = []
        for rel in ("r2", "r3"):
            d = h.deploy(rel)
            log("%s: deploy %s" % (mode, d))
            r["deploys"].append(d)
    except BenchError as e:
        r["error"] = str(e)
        log("%s: error: %s" % (mode, e))
    except Exception as e:  # noqa: BLE001 - reported; the other variants still run
        r["error"] = "unexpected %s: %s" % (type(e).__name__, e)
        log("%s: error: %s" % (mode, r["error"]))
    finally:
        h.stop()
    return r


# ---------------------------------------------------------------- gunicorn


def run_gunicorn(args, py, preload, work):
    name = "gunicorn-preload" if preload else "gunicorn"
    port = free_port()
    ready_dir = os.path.join(work, "ready")
    os.makedirs(ready_dir, exist_ok=True)
    gunicorn = os.path.join(os.path.dirname(py), "gunicorn")
    cmd = [gunicorn, "-w", str(args.workers), "-b", "127.0.0.1:%d" % port,
           "--pythonpath", os.path.join(work, "current"),
           "-c", os.path.join(HERE, "gunicorn_conf.py"), "--graceful-timeout", "10",
           "--no-control-socket"]
    if preload:
        cmd.append("--preload")
    cmd.append("app:app")
    r = {"variant": name, "server": " ".join(["gunicorn", "-w", str(args.workers), "(sync)"]
                                             + (["--preload"] if preload else []))}
    env = dict(os.environ, ZBENCH_READY_DIR=ready_dir, PYTHONDONTWRITEBYTECODE="1")
    glog = open(os.path.join(work, "gunicorn.log"), "w")
    t0 = time.monotonic()
    master = subprocess.Popen(cmd, cwd=work, env=env, stdout=glog, stderr=subprocess.STDOUT)

    def loaded():
        """Worker pid -> the monotonic time it had loaded the app, for live workers."""
        if master.poll() is not None:
            raise BenchError("gunicorn exited with %s (see %s/gunicorn.log)"
                             % (master.returncode, work))
        live = set(children(master.pid))
        out = {}
        for f in os.listdir(ready_dir):
            if f.isdigit() and int(f) in live:
                with open(os.path.join(ready_dir, f)) as fh:
                    out[int(f)] = float(fh.read())
        return out

    try:
        log("%s: starting %d workers" % (name, args.workers))
        wait_for("%d loaded workers" % args.workers,
                 lambda: len(loaded()) >= args.workers, 300, 0.05)
        r["cold_start_16_s"] = round(time.monotonic() - t0, 2)
        pids = sorted(loaded())
        log("%s: %d workers loaded in %.1f s; warming" % (name, len(pids), r["cold_start_16_s"]))
        r["memory_before_requests"] = memory(pids, {})
        r["warm"] = warm(port, pids, args.warm, args.warm_max_requests, args.warm_max_seconds)
        r["memory"] = memory(pids, {"master": master.pid})
        log("%s: memory %s" % (name, r["memory"]))

        times = []
        for _ in range(args.reps):
            before = set(loaded())
            t = time.monotonic()
            os.kill(master.pid, signal.SIGTTIN)
            new = wait_for("a worker after TTIN",
                           lambda: [v for p, v in loaded().items() if p not in before], 60, 0.005)
            times.append((new[0] - t) * 1000)
            os.kill(master.pid, signal.SIGTTOU)
            wait_for("%d workers after TTOU" % args.workers,
                     lambda: len(children(master.pid)) == args.workers, 60)
        r["one_worker"] = {
            "how": "SIGTTIN to the master -> the new worker's post_worker_init (app loaded), "
                   "median of %d" % args.reps,
            "median_ms": round(statistics.median(times), 1),
            "all_ms": [round(x, 1) for x in times],
        }
        log("%s: one worker %s" % (name, r["one_worker"]))

        # HUP with a new release whose import takes --import-seconds.
        old = set(children(master.pid))
        point(work, "r2")
        t = time.monotonic()
        os.kill(master.pid, signal.SIGHUP)

        def replaced():
            now = loaded()
            if os.environ.get("ZBENCH_DEBUG"):
                log("HUP: %d loaded, %d old left"
                    % (len(now), len(set(children(master.pid)) & old)))
            return (len(now) >= args.workers and not (set(now) & old)
                    and not (set(children(master.pid)) & old))
        wait_for("every worker replaced after HUP", replaced, 120, 0.05)
        wall = time.monotonic() - t
        new_ready = sorted(v for p, v in loaded().items() if p not in old)
        r["deploys"] = [{
            "release": "r2",
            "how": "repoint current, SIGHUP; wall: until every old worker has exited and %d "
                   "new ones have loaded the app; all ready: the last new worker loaded"
                   % args.workers,
            "wall_s": round(wall, 2),
            "all_ready_s": round(new_ready[args.workers - 1] - t, 2),
            "answers_after": releases_answering(port),
        }]
        log("%s: HUP %s" % (name, r["deploys"][0]))
    except BenchError as e:
        r["error"] = str(e)
        log("%s: error: %s" % (name, e))
    except Exception as e:  # noqa: BLE001 - reported; the other variants still run
        r["error"] = "unexpected %s: %s" % (type(e).__name__, e)
        log("%s: error: %s" % (name, r["error"]))
    finally:
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(30)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        glog.close()
    return r


# ---------------------------------------------------------------- report


def table(results, import_s):
    rows = [("variant", "warmed", "median USS/worker MB (before requests)",
             "median PSS/worker MB", "total PSS MB", "zygote/master PSS MB",
             "16 ready (cold) s", "one more worker ms",
             "deploy of the %.0f s app: wall s (all ready s)" % import_s, "after deploy")]
    for r in results:
        if "error" in r and "memory" not in r:
            rows.append((r["variant"], "error: " + r["error"][:160]) + ("",) * 8)
            continue
        m = r.get("memory", {})
        ex = m.get("extra", {})
        lead = ex.get("zygote") or ex.get("master") or {}
        ow = r.get("one_worker", {})
        deps = r.get("deploys", [])
        dep = ", ".join("%s (%s)" % (d["wall_s"], d.get("all_ready_s", "-")) for d in deps)
        after = ", ".join(json.dumps(d["answers_after"]) for d in deps)
        w = r.get("warm", {})
        warmed = "%s/%s x%s" % (w.get("workers_warmed"), m.get("workers"), w.get("min_per_worker"))
        cold = r.get("memory_before_requests", {}).get("median_uss_mb", "-")
        rows.append((r["variant"], warmed, "%s (%s)" % (m.get("median_uss_mb", ""), cold),
                     str(m.get("median_pss_mb", "")), str(m.get("total_pss_mb", "")),
                     str(lead.get("pss_mb", "-")),
                     str(r.get("cold_start_16_s", "")), str(ow.get("median_ms", "")),
                     dep, after + (" error: " + r["error"] if "error" in r else "")))
    out = []
    for i, row in enumerate(rows):
        out.append("| " + " | ".join(row) + " |")
        if i == 0:
            out.append("|" + "---|" * len(row))
    return "\n".join(out)


def goals(results, import_s):
    """The issue's goals, for the variants that were measured."""
    by = {r["variant"]: r for r in results if "memory" in r}
    out = []
    z = by.get("zygote")
    if not z and "zygote-preview" in by:
        z = by["zygote-preview"]
        out.append("goals, checked on zygote-preview (the driver plays the agent):")
    if not z:
        return ["goals: not checked (zygote mode was not measured)"]
    zu = z["memory"]["median_uss_mb"]
    if "exec" in by:
        eu = by["exec"]["memory"]["median_uss_mb"]
        out.append("USS per worker: exec / zygote = %.1f (goal >= 4)" % (eu / zu))
    if "gunicorn-preload" in by:
        gu = by["gunicorn-preload"]["memory"]["median_uss_mb"]
        out.append("USS per worker: zygote %.1f MB vs gunicorn --preload %.1f MB (goal: no worse)"
                   % (zu, gu))
    if "one_worker" in z:
        out.append("one more worker: %.1f ms (goal < 10 ms)" % z["one_worker"]["median_ms"])
    for d in z.get("deploys", []):
        out.append("deploy of the %.0f s app: %.2f s = %.2f x the import time (goal < 1.3 x)"
                   % (import_s, d["wall_s"], d["wall_s"] / import_s))
    return out


def threads_args(args):
    """The worker's arguments for ``--threads`` (none: a thread per connection)."""
    return [] if args.threads is None else ["--threads", str(args.threads)]


def server_shape(args):
    """How the built-in server runs requests, for the table."""
    if args.threads is None:
        return " (a thread per connection)"
    return " (%d request%s at once)" % (args.threads, "" if args.threads == 1 else "s")


def main():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    cache = os.environ.get("ZBENCH_DIR") or os.path.join(target, "zygote-bench")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(VARIANTS),
                    help="comma-separated variants of: %s" % ", ".join(VARIANTS))
    ap.add_argument("--venv", default=os.environ.get("ZBENCH_VENV") or os.path.join(cache, "venv"))
    ap.add_argument("--work", default=os.path.join(cache, "run"),
                    help="scratch directory (emptied first)")
    ap.add_argument("--hatchery", default=os.environ.get("HATCHERY_BIN")
                    or os.path.join(target, "release", "hatchery"))
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5, help="one-more-worker measurements")
    ap.add_argument("--warm", type=int, default=5, help="requests each worker answers first")
    ap.add_argument("--warm-max-requests", type=int, default=3000)
    ap.add_argument("--warm-max-seconds", type=float, default=60)
    ap.add_argument("--import-seconds", type=float, default=3.0)
    ap.add_argument("--probation", default="0s", help="Hatchery's deploy.probation")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="Hatchery's workers (zygote, preview, exec) serve at most N requests at "
                    "once (the built-in server's --threads; 1: one at a time, as gunicorn's "
                    "sync workers); default: a thread per connection")
    ap.add_argument("--out", default=None, help="JSON results (default WORK/results.json)")
    args = ap.parse_args()
    only = [v.strip() for v in args.only.split(",") if v.strip()]
    bad = [v for v in only if v not in VARIANTS]
    if bad:
        ap.error("--only: unknown variant(s) %s; accepted: %s" % (bad, ", ".join(VARIANTS)))
    if any(v in ("zygote", "exec") for v in only) and not os.access(args.hatchery, os.X_OK):
        ap.error("--hatchery: %s is not an executable (cargo build --release)" % args.hatchery)

    py, versions = ensure_venv(args.venv)
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    probe = make_release(os.path.join(args.work, "probe"), "r0", args.import_seconds)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "packages": versions,
        "hatchery": (subprocess.run([args.hatchery, "--version"], capture_output=True,
                                    text=True).stdout.strip()
                     if os.access(args.hatchery, os.X_OK) else None),
        "import_seconds_target": args.import_seconds,
        "import_seconds_one_process": round(import_time(py, probe), 2),
        "heavy_import_seconds_one_process": round(import_time(py, make_release(
            os.path.join(args.work, "probe"), "r00")), 2),
        "workers": args.workers,
        "threads": args.threads,
        "probation": args.probation,
    }
    log("setup: %s" % meta)
    results = []
    for v in only:
        work = os.path.join(args.work, v)
        os.makedirs(work)
        make_release(work, "r1")
        make_release(work, "r2", args.import_seconds)
        make_release(work, "r3", args.import_seconds)
        point(work, "r1")
        if v in ("zygote", "exec"):
            results.append(run_hatchery(args, py, v, work))
        elif v == "zygote-preview":
            import zygote_preview  # noqa: PLC0415 - only this variant needs it
            results.append(zygote_preview.run_preview(args, py, REPO, work, sys.modules[__name__]))
        else:
            results.append(run_gunicorn(args, py, v == "gunicorn-preload", work))
    meta["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    meta["seconds"] = round(time.monotonic() - T_START, 1)
    out = args.out or os.path.join(args.work, "results.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(json.dumps(meta, indent=1))
    print(table(results, args.import_seconds))
    print("\n".join(goals(results, args.import_seconds)))
    print("\nresults: %s" % out)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
