#!/usr/bin/env python3
# usage: bench/single-crash.py N TRIALS BIN...: single-crash restart of each build in turn (the
# harness adapter's site with N pbworker workers; `limit` for limitsup): kill -9 of one random
# worker, the time until its replacement has exec'd (the harness's proc-connector `Watch`),
# TRIALS times with random gaps; prints the median and range. Root; the shared harness
# (`PB_DIR`, default ../shared/bench) set up with its setup.sh.
import sys, os, time, signal, subprocess, shutil, statistics, random
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("PB_DIR", os.path.join(HERE, "..", "shared", "bench")))
import bench  # noqa: E402
n, trials, bins = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
W = "/tmp/peers-bench/bin/pbworker"
w = bench.Watch(W)
for b in bins:
    d = f"/tmp/single-{os.getpid()}"; shutil.rmtree(d, ignore_errors=True); os.makedirs(d)
    if b == "limit":
        cmd = ["/tmp/peers-bench/bin/limitsup", str(n), W]
    else:
        subprocess.run(["bash", os.path.join(HERE, "bench", "hatchery.sh"), "config", d, str(n), W], check=True)
        cmd = [b, "agent", "--config", f"{d}/hatchery.toml"]
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    w.track.add(p.pid)
    w.wait_until(lambda: len(w.live) >= n, 120)
    bench.settle(w)
    lat = []
    for _ in range(trials):
        victim = random.choice(list(w.live)); t0 = bench.now_ns()
        os.kill(victim, signal.SIGKILL)
        w.wait_until(lambda: any(ts > t0 for ts in w.live.values()), 15, step=0.01)
        lat.append((min(ts for ts in w.live.values() if ts > t0) - t0) / 1e6)
        w.wait_until(lambda: len(w.live) >= n, 15)
        w.sleep(0.2 + random.random() * 0.5)
    p.send_signal(signal.SIGTERM)
    w.wait_until(lambda: not w.live and p.pid in w.status, 60)
    print(f"{os.path.basename(b)}: single-crash median {statistics.median(lat):.2f} ms ({min(lat):.2f}-{max(lat):.2f})", flush=True)
