#!/usr/bin/env python3
"""What looking costs the agent (issue 15): its CPU with `hatchery top`'s subscription
(`watch`, the overview and one site's view) and a Prometheus scrape of `/metrics`, each once
a second, beside the same agent with nobody looking. N `sleep` workers in one site.

    bench/observe.py [--bin target/release/hatchery] [--workers 1000] [--secs 60] [--cgroups]

The agent's CPU time is read from /proc/<pid>/schedstat over each window. Prints one line
per window: what was looking, the agent's CPU in % of one core, and the snapshot sizes.
"""
import argparse, json, os, shutil, socket, subprocess, tempfile, threading, time

p = argparse.ArgumentParser()
here = os.path.dirname(os.path.abspath(__file__))
p.add_argument("--bin", default=os.path.join(here, "..", "target", "release", "hatchery"))
p.add_argument("--workers", type=int, default=1000)
p.add_argument("--secs", type=float, default=60)
p.add_argument("--cgroups", action="store_true", help="cgroup_base auto (a leaf per worker)")
a = p.parse_args()

d = tempfile.mkdtemp(prefix="hatchery-observe-")
os.makedirs(d + "/sites.d")
port = 19464
with open(d + "/hatchery.toml", "w") as f:
    f.write(f'control_socket = "{d}/control.sock"\nstate_dir = "{d}/state"\n'
            f'sites_dir = "{d}/sites.d"\nmetrics = "127.0.0.1:{port}"\n')
    if not a.cgroups:
        f.write('cgroup_base = "off"\n')
with open(d + "/sites.d/bench.toml", "w") as f:
    f.write(f'name = "bench"\ncommand = ["/bin/sleep", "1000000"]\nworkers = {a.workers}\n'
            'output = "socket"\n')
agent = subprocess.Popen([a.bin, "agent", "--config", d + "/hatchery.toml"],
                         stderr=open(d + "/agent.log", "w"))
sock = d + "/control.sock"


def ready():
    out = subprocess.run([a.bin, "--socket", sock, "status", "--json"], capture_output=True)
    try:
        return json.loads(out.stdout)["sites"][0]["ready"] == a.workers
    except (ValueError, KeyError, IndexError):
        return False


deadline = time.monotonic() + 600
while not ready():
    if time.monotonic() > deadline or agent.poll() is not None:
        raise SystemExit("the workers did not all become ready")
    time.sleep(0.5)
time.sleep(3)


def cpu_ns():
    with open(f"/proc/{agent.pid}/schedstat") as f:
        return int(f.read().split()[0])


def watch(req, stats, stop):
    c = socket.socket(socket.AF_UNIX)
    c.connect(sock)
    c.sendall((json.dumps(req) + "\n").encode())
    f = c.makefile("rb")
    while not stop.is_set():
        line = f.readline()
        if not line:
            break
        stats["n"] += 1
        stats["bytes"] = len(line)
    c.close()


def scrape(stats, stop):
    while not stop.wait(1.0):
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            body = b""
            while chunk := c.recv(65536):
                body += chunk
        stats["n"] += 1
        stats["bytes"] = len(body)


def window(label, lookers):
    stop = threading.Event()
    stats = [{"n": 0, "bytes": 0} for _ in lookers]
    threads = [threading.Thread(target=fn, args=(*args, s, stop), daemon=True)
               for (fn, args), s in zip(lookers, stats)]
    for t in threads:
        t.start()
    time.sleep(2)
    c0, t0 = cpu_ns(), time.monotonic()
    time.sleep(a.secs)
    c1, t1 = cpu_ns(), time.monotonic()
    stop.set()
    sizes = ", ".join(f"{s['n']} × {s['bytes']} B" for s in stats)
    print(f"{label:<42} {100 * (c1 - c0) / 1e9 / (t1 - t0):7.3f} % of a core"
          + (f"   ({sizes})" if sizes else ""), flush=True)
    time.sleep(2)


overview = (watch, ({"cmd": "watch", "interval_ms": 1000},))
site = (watch, ({"cmd": "watch", "interval_ms": 1000, "site": "bench"},))
metrics = (scrape, ())
print(f"{a.workers} sleep workers, cgroups {'on' if a.cgroups else 'off'}, {a.secs:.0f} s windows")
window("nobody looking", [])
window("top (overview) at 1 Hz", [overview])
window("/metrics scraped at 1 Hz", [metrics])
window("top (overview) and /metrics, each at 1 Hz", [overview, metrics])
window("top (the site's view, every worker) at 1 Hz", [site])
window("nobody looking again", [])
subprocess.run([a.bin, "--socket", sock, "stop", "bench"], capture_output=True)
agent.terminate()
agent.wait()
shutil.rmtree(d, ignore_errors=True)
