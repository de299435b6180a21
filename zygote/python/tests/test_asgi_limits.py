"""The built-in ASGI server's limits, with the limits lowered: serve_asgi runs in a forked
child (the limits are module constants, process-wide state), on a loopback listener."""

import os
import signal
import socket
import sys
import unittest

from harness import read_to_end, readable, wait_exit_code

import tiny_asgi
from hatchery_zygote import asgi


class AsgiLimitsTest(unittest.TestCase):
    def serve(self, **limits):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.addCleanup(listener.close)
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                quiet = os.open(os.devnull, os.O_WRONLY)
                os.dup2(quiet, 1)
                os.dup2(quiet, 2)
                for name, value in limits.items():
                    setattr(asgi, name, value)
                code = asgi.serve_asgi(tiny_asgi.app, [listener], lambda: os.write(ready_w, b"r"))
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(ready_w)
        self.addCleanup(self.kill, pid)
        self.assertTrue(readable(ready_r, 10), "the server never became ready")
        self.assertEqual(os.read(ready_r, 1), b"r")
        os.close(ready_r)
        return pid, listener.getsockname()[1]

    def kill(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def test_connections_beyond_the_limit_are_answered_503(self):
        pid, port = self.serve(MAX_CONNECTIONS=1)
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(first.recv(4096).startswith(b"HTTP/1.1 200"))  # kept alive
        with socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            answer = read_to_end(second)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503"), answer)
        first.close()
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(wait_exit_code(pid), 0)

    def test_a_client_that_stalls_in_its_body_is_dropped(self):
        pid, port = self.serve(BODY_TIMEOUT_S=0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            # The app sees http.disconnect and returns without answering: the server
            # closes the connection.
            answer = read_to_end(s)
        self.assertNotIn(b"ABC", answer)
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(wait_exit_code(pid), 0)

    def test_a_head_that_never_ends_is_dropped(self):
        pid, port = self.serve(HEAD_TIMEOUT_S=0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            self.assertEqual(read_to_end(s), b"")
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(wait_exit_code(pid), 0)


if __name__ == "__main__":
    unittest.main()
