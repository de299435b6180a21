"""The built-in WSGI server's bounded shapes (``--threads N``) and its BUSY reports.

``serve_wsgi`` runs in a forked child on a loopback listener, with NOTIFY_SOCKET bound by
the test. The app is a gate: each request says which path it is on the ``started`` pipe,
then waits for a byte on that path's own ``release`` pipe, so the test decides when each
request ends. Whether a connection waits in the kernel's accept queue is read from the
listener itself (TCP_INFO: for a listening socket ``tcpi_unacked`` is the accept queue's
length). Every wait is for an event, bounded by a timeout.

Last, the helper started as an exec-mode worker (no zygote link, listeners of its own)."""

import http.client
import os
import signal
import socket
import struct
import sys
import tempfile
import time
import unittest

from harness import HERE, ROOT, read_to_end, readable, wait_exit_code

from hatchery_zygote import server

TIMEOUT_S = 10
PATHS = ("a", "b", "c")
TCPI_UNACKED_OFFSET = 24  # 8 one-byte fields, then rto, ato, snd_mss, rcv_mss, unacked


def accept_queue(listener):
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, TCPI_UNACKED_OFFSET)[0]


class Gate:
    """Pipes shared with the forked server: ``started`` (one line per request that
    began), and one ``release`` pipe per path."""

    def __init__(self):
        self.started_r, self.started_w = os.pipe()
        self.release = {p: os.pipe() for p in PATHS}
        self.pending = b""

    def app(self, environ, start_response):
        path = environ["PATH_INFO"].strip("/")
        os.write(self.started_w, path.encode() + b"\n")
        os.read(self.release[path][0], 1)
        body = b"done " + path.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    def next_started(self):
        while b"\n" not in self.pending:
            if not readable(self.started_r, TIMEOUT_S):
                raise AssertionError("no request started within %d s" % TIMEOUT_S)
            self.pending += os.read(self.started_r, 64)
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def none_started(self):
        return not self.pending and not readable(self.started_r, 0)

    def open(self, path):
        os.write(self.release[path][1], b"x")

    def close(self):
        for fd in [self.started_r, self.started_w] + [f for p in self.release.values() for f in p]:
            os.close(fd)


class BoundedServerTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.notify_path = os.path.join(self.dir.name, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(TIMEOUT_S)
        self.addCleanup(self.notify.close)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]
        self.gate = Gate()
        self.addCleanup(self.gate.close)
        self.clients = []

    def serve(self, notify_path=None, **kwargs):
        """Forks the server; returns once it is about to serve."""
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                quiet = os.open(os.devnull, os.O_WRONLY)
                os.dup2(quiet, 1)
                os.dup2(quiet, 2)
                os.environ["NOTIFY_SOCKET"] = notify_path or self.notify_path
                os.write(ready_w, b"r")
                server.serve_wsgi(self.gate.app, [self.listener], **kwargs)
                code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        self.addCleanup(self.kill, pid)
        self.assertTrue(readable(ready_r, TIMEOUT_S), "the server never started")
        os.close(ready_r)
        return pid

    def kill(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def request(self, path):
        c = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT_S)
        self.clients.append(c)
        self.addCleanup(c.close)
        c.sendall(b"GET /" + path.encode() + b" HTTP/1.0\r\n\r\n")
        return c

    def answer(self, conn):
        data = read_to_end(conn)
        self.assertTrue(data.startswith(b"HTTP/1.0 200"), data)
        return data.rsplit(b"\r\n\r\n", 1)[1].decode()

    def expect_queue(self, n):
        """Waits (bounded) until the listener's accept queue holds ``n`` connections."""
        # The kernel has no event for it: poll, bounded (the final ACK of a loopback
        # handshake may be processed just after connect() returns).
        deadline = time.monotonic() + TIMEOUT_S
        while accept_queue(self.listener) != n and time.monotonic() < deadline:
            time.sleep(0.002)
        self.assertEqual(accept_queue(self.listener), n)

    def expect_notify(self, state):
        self.assertEqual(self.notify.recv(64), state)

    def expect_no_more_notify(self):
        self.notify.setblocking(False)
        with self.assertRaises(BlockingIOError):
            print("unexpected:", self.notify.recv(64))

    def stop(self, pid):
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(wait_exit_code(pid), 0)

    def test_sync_worker_serves_one_request_at_a_time(self):
        pid = self.serve(threads=1, busy_reports=True)
        a = self.request("a")
        self.assertEqual(self.gate.next_started(), "a")
        self.expect_notify(b"BUSY=1")
        b = self.request("b")
        # b is connected, and waits in the kernel's accept queue, not in the worker.
        self.expect_queue(1)
        self.assertTrue(self.gate.none_started())
        self.gate.open("a")
        self.assertEqual(self.answer(a), "done a")
        self.expect_notify(b"BUSY=0")
        # Only now is b accepted.
        self.assertEqual(self.gate.next_started(), "b")
        self.expect_notify(b"BUSY=1")
        self.expect_queue(0)
        self.gate.open("b")
        self.assertEqual(self.answer(b), "done b")
        self.expect_notify(b"BUSY=0")
        self.stop(pid)
        self.expect_no_more_notify()

    def test_a_pool_of_two_serves_two_and_leaves_the_third_queued(self):
        pid = self.serve(threads=2, busy_reports=True)
        a = self.request("a")
        self.assertEqual(self.gate.next_started(), "a")
        b = self.request("b")
        self.assertEqual(self.gate.next_started(), "b")
        self.expect_notify(b"BUSY=1")  # only once both are in use
        c = self.request("c")
        self.expect_queue(1)
        self.assertTrue(self.gate.none_started())
        self.gate.open("a")
        self.assertEqual(self.answer(a), "done a")
        self.expect_notify(b"BUSY=0")
        self.assertEqual(self.gate.next_started(), "c")
        self.expect_notify(b"BUSY=1")
        self.gate.open("b")
        self.assertEqual(self.answer(b), "done b")
        self.expect_notify(b"BUSY=0")
        self.gate.open("c")
        self.assertEqual(self.answer(c), "done c")
        # From one in use to none is no transition: nothing more is said.
        self.stop(pid)
        self.expect_no_more_notify()

    def test_sigterm_finishes_the_request_in_flight(self):
        pid = self.serve(threads=1)
        a = self.request("a")
        self.assertEqual(self.gate.next_started(), "a")
        os.kill(pid, signal.SIGTERM)
        self.gate.open("a")
        self.assertEqual(self.answer(a), "done a")
        self.assertEqual(wait_exit_code(pid), 0)
        # Without busy_reports nothing is sent.
        self.expect_no_more_notify()

    def test_reports_that_cannot_be_sent_do_not_break_requests(self):
        pid = self.serve(notify_path=os.path.join(self.dir.name, "nobody"), threads=1,
                         busy_reports=True)
        for path in ("a", "b"):
            conn = self.request(path)
            self.assertEqual(self.gate.next_started(), path)
            self.gate.open(path)
            self.assertEqual(self.answer(conn), "done " + path)
        self.stop(pid)

    def test_unbounded_by_default(self):
        pid = self.serve()
        a = self.request("a")
        b = self.request("b")
        c = self.request("c")
        # All three in flight at once: a thread per connection.
        self.assertEqual(sorted(self.gate.next_started() for _ in range(3)), ["a", "b", "c"])
        for path, conn in (("a", a), ("b", b), ("c", c)):
            self.gate.open(path)
            self.assertEqual(self.answer(conn), "done " + path)
        self.stop(pid)
        self.expect_no_more_notify()

    def test_busy_reports_need_a_bound(self):
        with self.assertRaises(ValueError):
            server.serve_wsgi(self.gate.app, [], busy_reports=True)
        with self.assertRaises(ValueError):
            server.serve_wsgi(self.gate.app, [], threads=0)


class ExecModeWorkerTest(unittest.TestCase):
    """``python -m hatchery_zygote --threads 1 --busy-reports tiny_app:app`` started as a
    supervisor starts an exec-mode worker: listener at fd 3, LISTEN_FDS, LISTEN_PID."""

    def run_helper(self, args, listener=None, notify_path=None):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]),
                   HATCHERY_WORKER_ID="3")
        env.pop("HATCHERY_ZYGOTE_FD", None)
        env.pop("LISTEN_PID", None)
        env.pop("LISTEN_FDS", None)
        if notify_path:
            env["NOTIFY_SOCKET"] = notify_path
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(err_w, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                if listener is not None:
                    os.dup2(listener.fileno(), 3)  # dup2 clears CLOEXEC on 3
                    env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
                os.execve(sys.executable, [sys.executable, "-m", "hatchery_zygote"] + args, env)
            finally:
                os._exit(127)
        os.close(err_w)
        self.addCleanup(os.close, err_r)
        return pid, err_r

    def test_usage_errors_exit_2(self):
        for args, says in (
            (["--busy-reports", "tiny_app:app"], b"--busy-reports needs --threads"),
            (["--threads", "0", "tiny_app:app"], b"at least 1"),
            (["--threads", "2", "--interface", "asgi", "tiny_asgi:app"],
             b"--threads applies to the built-in WSGI server only"),
        ):
            pid, err = self.run_helper(args)
            self.assertEqual(wait_exit_code(pid), 2, args)
            self.assertIn(says, os.read(err, 4096), args)

    def test_without_link_or_listeners_it_refuses(self):
        pid, err = self.run_helper(["tiny_app:app"])
        self.assertEqual(wait_exit_code(pid), 1)
        self.assertIn(b"nor as a worker", os.read(err, 4096))

    def test_serves_as_an_exec_mode_worker(self):
        with tempfile.TemporaryDirectory() as d:
            notify_path = os.path.join(d, "notify")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
                    socket.socket() as listener:
                notify.bind(notify_path)
                notify.settimeout(TIMEOUT_S)
                listener.bind(("127.0.0.1", 0))
                listener.listen(16)
                pid, _ = self.run_helper(["--threads", "1", "--busy-reports", "tiny_app:app"],
                                         listener, notify_path)
                try:
                    self.assertEqual(notify.recv(64), b"READY=1")
                    conn = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1],
                                                      timeout=TIMEOUT_S)
                    conn.request("GET", "/")
                    body = conn.getresponse().read().decode()
                    conn.close()
                    self.assertIn("tiny app: worker 3, pid %d" % pid, body)
                    self.assertEqual(notify.recv(64), b"BUSY=1")
                    self.assertEqual(notify.recv(64), b"BUSY=0")
                    os.kill(pid, signal.SIGTERM)
                    self.assertEqual(wait_exit_code(pid), 0)
                finally:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    except (ProcessLookupError, ChildProcessError):
                        pass


if __name__ == "__main__":
    unittest.main()
