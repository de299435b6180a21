"""A full round trip with a WSGI app: this test plays the agent (see harness.py) against
``python -m hatchery_zygote tiny_app:app --hooks tiny_hooks``."""

import http.client
import os
import signal
import socket
import unittest

from harness import ZygoteTestCase, read_to_end, read_until, readable, wait_exit_code

from hatchery_zygote.protocol import Failed, Forked, Spare  # after harness: sys.path


class RoundTripTest(ZygoteTestCase):
    ARGS = ["tiny_app:app", "--hooks", "tiny_hooks"]

    def test_round_trip(self):
        self.expect_ready()
        # Loaded, and the first worker forked ahead (a spare) before READY.
        self.assertEqual(self.hook_lines(), ["load %d" % self.zygote, "before %d" % self.zygote])

        pid, out = self.start_worker(0, 1)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
        conn.close()
        self.assertIn(
            "tiny app: worker 0, pid %d, generation 5, hooks load,before,after" % pid, body
        )

        refused, go1, out1 = self.fork(1, 2)
        os.close(go1)
        self.assertEqual(wait_exit_code(refused), 1)
        self.assertEqual(os.read(out1, 64), b"")
        os.close(out1)

        self.link.close()
        self.assertEqual(wait_exit_code(self.zygote), 0)

        read_until(out, b"worker 0 (pid %d) serving" % pid)
        # SIGTERM with a request in flight: it is answered, then the worker exits 0.
        slow = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        slow.sendall(b"POST /slow HTTP/1.0\r\nContent-Length: 5\r\n\r\n")
        read_until(out, b"slow request started")
        os.kill(pid, signal.SIGTERM)
        # Stopped accepting while the request waits for its body: it is still answered.
        read_until(out, b"hatchery_zygote: stopping")
        slow.sendall(b"hello")
        answer = read_to_end(slow)
        slow.close()
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer)
        self.assertEqual(wait_exit_code(pid), 0)
        os.close(out)

    def test_a_fork_with_two_output_fds_gives_the_worker_stdout_and_stderr_apart(self):
        self.expect_ready()
        err_r, err_w = os.pipe()
        pid, out = self.start_worker(0, 1, err_w)
        os.close(err_w)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/both")
        body = conn.getresponse().read().decode()
        conn.close()
        self.assertIn("worker 0, pid %d" % pid, body)
        self.assertNotIn(b"to stderr", read_until(out, b"to stdout"))
        self.assertNotIn(b"to stdout", read_until(err_r, b"to stderr"))
        os.close(err_r)
        os.close(out)

    def test_before_fork_runs_in_the_zygote_before_each_fork(self):
        self.expect_ready()
        zygote = "%d" % self.zygote
        # The spare forked before READY.
        self.assertEqual(self.hook_lines(), ["load " + zygote, "before " + zygote])
        for n in range(1, 4):
            _, go, out = self.fork(n, n)
            # The FORK took the spare; the next spare is forked after the answer: the
            # hook ran (in the zygote) once per fork, n workers and one spare.
            self.wait_hook_lines(["load " + zygote] + ["before " + zygote] * (n + 1))
            os.close(go)
            os.close(out)
        # A refused worker never ran after_fork: only the zygote's hooks are logged.

    def test_a_failing_before_fork_fails_that_fork_only(self):
        self.expect_ready()
        with open(self.hooks_log + ".fail", "w"):
            pass
        # The spare, forked before READY, answers the first FORK; then the hook fails
        # for the next spare, and again for the fork on demand: that FORK fails.
        _, go, out = self.fork(0, 1)
        os.close(go)
        os.close(out)
        out_r, out_w = os.pipe()
        socket.send_fds(self.link, [b"FORK 0 2"], [out_w])
        os.close(out_w)
        answer, fds = self.receive()
        self.assertEqual(fds, [])
        self.assertEqual(
            answer, Failed(2, "before_fork hook failed: RuntimeError('told to fail')")
        )
        # The output pipe was closed by the zygote (no worker holds it).
        self.assertEqual(os.read(out_r, 64), b"")
        os.close(out_r)
        os.unlink(self.hooks_log + ".fail")
        _, go, out = self.fork(0, 3)  # the zygote still serves
        os.close(go)
        os.close(out)


class SpareTest(ZygoteTestCase):
    """Version 3: each worker forked ahead is announced (``SPARE <pid>``) before the FORK
    that takes it, so the agent can move it into its cgroup leaf ahead."""

    ARGS = ["tiny_app:app"]

    def test_each_spare_is_announced_before_the_fork_that_takes_it(self):
        self.expect_ready()
        # The first spare, forked before READY, is announced right after it.
        message, _ = self.receive(skip_spares=False)
        self.assertIsInstance(message, Spare)
        for n in range(3):
            pid, go, out = self.fork(n, n + 1)
            self.assertEqual(pid, self.spares[-1], "FORK %d took the announced spare" % n)
            os.close(go)
            os.close(out)
            self.assertEqual(wait_exit_code(pid), 1)  # no go: no app code
            # The next spare, forked after the answer, is announced before the next FORK
            # is read.
            message, _ = self.receive(skip_spares=False)
            self.assertEqual(message, Spare(self.spares[-1]))
            self.assertNotEqual(self.spares[-1], pid)


class OlderAgentTest(ZygoteTestCase):
    """An agent that does not say its version (before version 3) gets READY 2 and no
    SPARE: the message after READY is the FORK's answer."""

    ARGS = ["tiny_app:app"]
    AGENT_VERSION = None

    def test_no_spare_is_announced_to_an_agent_of_version_2(self):
        self.expect_ready()
        out_r, out_w = os.pipe()
        socket.send_fds(self.link, [b"FORK 0 1"], [out_w])
        os.close(out_w)
        answer, fds = self.receive(skip_spares=False)
        self.assertEqual(answer, Forked(1, answer.pid))
        self.workers.append(answer.pid)
        self.assertEqual(len(fds), 1)
        os.close(fds[0])
        os.close(out_r)
        self.assertEqual(wait_exit_code(answer.pid), 1)
        self.assertEqual(self.spares, [])


class InterfaceMismatchTest(ZygoteTestCase):
    ARGS = ["tiny_asgi:app"]  # an ASGI app, with the default --interface wsgi

    def test_an_asgi_app_as_wsgi_is_refused_with_the_fix(self):
        self.assertEqual(wait_exit_code(self.zygote), 1)
        self.assertTrue(readable(self.stderr_r, 0))
        self.assertIn(b"pass --interface asgi", os.read(self.stderr_r, 4096))
        self.assertEqual(self.link.recv(513), b"")  # never READY


if __name__ == "__main__":
    unittest.main()
