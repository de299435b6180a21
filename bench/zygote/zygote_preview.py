"""The ``zygote-preview`` variant: until Hatchery's event loop starts zygotes (issue 12),
the driver plays the agent's side of the zygote protocol itself, as
``zygote/python/tests/test_roundtrip.py`` does, against the same
``python -m hatchery_zygote app:app`` command a zygote-mode site runs.

It is a preview, not Hatchery: no cgroup leaf, no sandbox, no control socket; the driver
is the child subreaper, forks over the ``SOCK_SEQPACKET`` link (``FORK`` with an output
fd, ``FORKED`` with the go pipe, ``go``) and counts ``READY=1`` datagrams on its own
NOTIFY_SOCKET. Each worker's output goes to /dev/null. The figures it gives (memory of
forked workers, fork-to-ready time, a new zygote's load plus 16 forks) are those of the
Python side; the agent adds its event loop and cgroup placement on top.
"""

import ctypes
import os
import select
import signal
import socket
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def _protocol(repo):
    sys.path.insert(0, os.path.join(repo, "zygote", "python"))
    from hatchery_zygote import protocol  # noqa: PLC0415 - the repo's copy, on purpose
    return protocol


class Zygote:
    """One zygote (a generation) on ``listener``, and the workers forked from it."""

    def __init__(self, py, repo, cwd, listener, notify_path, generation, threads=()):
        self.p = _protocol(repo)
        self.link, zend = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LISTEN_FDS": "1",
            "HATCHERY_ZYGOTE_FD": "4",
            "NOTIFY_SOCKET": notify_path,
            "HATCHERY_GENERATION": str(generation),
            "PYTHONPATH": os.path.join(repo, "zygote", "python"),
        }
        argv = [py, "-m", "hatchery_zygote", "app:app"] + list(threads)
        self.started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os.chdir(cwd)
                # Above 4 first, so that placing one cannot close the other.
                high_l = os.dup2(os.dup(listener.fileno()), 10, inheritable=False)
                high_z = os.dup2(os.dup(zend.fileno()), 11, inheritable=False)
                os.dup2(high_l, 3)
                os.dup2(high_z, 4)
                os.execve(py, argv, env)
            finally:
                os._exit(127)
        zend.close()
        self.pid = pid
        self.workers = []
        self.request = 0

    def wait_ready(self, timeout):
        r, _, _ = select.select([self.link], [], [], timeout)
        if not r:
            raise TimeoutError("the zygote sent no READY within %.0f s" % timeout)
        msg = self.p.parse_to_agent(self.link.recv(513))
        if not isinstance(msg, self.p.Ready):
            raise RuntimeError("the zygote said %r instead of READY" % (msg,))
        return time.monotonic() - self.started

    def fork(self, slot):
        """FORK, FORKED, go: returns the worker's pid (it then loads nothing, it is ready
        once it has sent READY=1)."""
        self.request += 1
        out = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        try:
            socket.send_fds(self.link, [self.p.format_message(self.p.Fork(slot, self.request))],
                            [out])
        finally:
            os.close(out)
        r, _, _ = select.select([self.link], [], [], 10)
        if not r:
            raise TimeoutError("no answer to FORK %d" % slot)
        data, fds, _, _ = socket.recv_fds(self.link, 513, 4)
        self.forked_at = time.monotonic()
        msg = self.p.parse_to_agent(data)
        if not isinstance(msg, self.p.Forked) or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("FORK %d answered %r" % (slot, msg))
        os.write(fds[0], self.p.GO)
        os.close(fds[0])
        self.workers.append(msg.pid)
        return msg.pid

    def close(self):
        """Closes the link (the zygote exits at its end) and reaps the zygote."""
        self.link.close()
        _reap([self.pid], 10)


def _reap(pids, timeout):
    end = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < end:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.discard(pid)
        if left:
            time.sleep(0.02)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def stop_workers(pids, timeout=15):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _reap(pids, timeout)


def run_preview(args, py, repo, work, h):
    """``h`` is the driver's module (its load, memory and timing helpers)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    r = {"variant": "zygote-preview",
         "server": "python -m hatchery_zygote app:app, the driver playing the agent"
         + h.server_shape(args)}
    notify_path = os.path.join(work, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(notify_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    zygotes = []

    def ready_datagrams(n, timeout):
        end = time.monotonic() + timeout
        got = 0
        while got < n:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("%d of %d READY=1 within %.0f s" % (got, n, timeout))
            rd, _, _ = select.select([notify], [], [], left)
            if rd and notify.recv(64) == b"READY=1":
                got += 1
        return time.monotonic()

    def generation(release, gen):
        cwd = os.path.realpath(os.path.join(work, "releases", release))
        z = Zygote(py, repo, cwd, listener, notify_path, gen, h.threads_args(args))
        zygotes.append(z)
        loaded = z.wait_ready(300)
        for slot in range(args.workers):
            z.fork(slot)
        t = ready_datagrams(args.workers, 60)
        return z, loaded, t - z.started

    try:
        h.log("zygote-preview: starting the zygote and forking %d workers" % args.workers)
        z, loaded, all_ready = generation("r1", 1)
        r["cold_start_16_s"] = round(all_ready, 2)
        r["zygote_loaded_s"] = round(loaded, 2)
        r["memory_before_requests"] = h.memory(z.workers, {})
        r["warm"] = h.warm(port, z.workers, args.warm, args.warm_max_requests,
                           args.warm_max_seconds)
        r["memory"] = h.memory(z.workers, {"zygote": z.pid})
        h.log("zygote-preview: memory %s" % r["memory"])
        times, forked = [], []
        for _ in range(args.reps):
            t = time.monotonic()
            pid = z.fork(args.workers)
            forked.append((z.forked_at - t) * 1000)
            times.append((ready_datagrams(1, 10) - t) * 1000)
            z.workers.remove(pid)
            stop_workers([pid])
        r["one_worker"] = {
            "how": "FORK on the link to the new worker's READY=1 (the driver plays the "
                   "agent), median of %d" % args.reps,
            "median_ms": round(h.statistics.median(times), 1),
            "all_ms": [round(x, 1) for x in times],
            "forked_median_ms": round(h.statistics.median(forked), 1),
            "forked_all_ms": [round(x, 1) for x in forked],
        }
        h.log("zygote-preview: one worker %s" % r["one_worker"])
        r["deploys"] = []
        for rel, gen in (("r2", 2), ("r3", 3)):
            old = zygotes[-1]
            new, loaded, all_ready = generation(rel, gen)
            old.close()
            stop_workers(old.workers)
            d = {"release": rel,
                 "how": "a new zygote on the release: started -> loaded -> %d workers "
                        "forked and ready (no probation, no drain; old workers then stopped)"
                        % args.workers,
                 "wall_s": round(all_ready, 2), "all_ready_s": round(all_ready, 2),
                 "zygote_loaded_s": round(loaded, 2),
                 "answers_after": h.releases_answering(port)}
            h.log("zygote-preview: deploy %s" % d)
            r["deploys"].append(d)
    except (OSError, RuntimeError, TimeoutError, h.BenchError) as e:
        r["error"] = "%s: %s" % (type(e).__name__, e)
        h.log("zygote-preview: error: %s" % r["error"])
    finally:
        for z in zygotes:
            if z.link.fileno() >= 0:
                z.close()
            stop_workers(z.workers)
        listener.close()
        notify.close()
    return r
