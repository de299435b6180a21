"""gunicorn hooks for the benchmark: each worker, once it has loaded the app, writes the
CLOCK_MONOTONIC time to $ZBENCH_READY_DIR/<pid>, so the driver can time TTIN to a new
worker ready to serve."""

import os
import time


def post_worker_init(worker):
    d = os.environ.get("ZBENCH_READY_DIR")
    if d:
        path = os.path.join(d, str(worker.pid))
        with open(path + ".tmp", "w") as f:
            f.write("%.6f\n" % time.monotonic())
        os.rename(path + ".tmp", path)
