"""The ASGI and callable entry points, through the real zygote protocol on a loopback
listener (see harness.py)."""

import http.client
import os
import signal
import socket
import unittest

from harness import ZygoteTestCase, read_to_end, read_until, readable, wait_exit_code


def request(conn, method, path, body=None, headers=None, **kw):
    conn.request(method, path, body=body, headers=headers or {}, **kw)
    response = conn.getresponse()
    return response, response.read()


class AsgiTest(ZygoteTestCase):
    ARGS = ["tiny_asgi:app", "--interface", "asgi", "--hooks", "tiny_hooks"]

    def test_serves_http_with_lifespan_in_the_worker(self):
        self.expect_ready()
        pid, out = self.start_worker(0, 1)
        # READY=1 came after the lifespan startup, which ran in the worker.
        read_until(out, b"lifespan startup in %d" % pid)

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        response, body = request(conn, "GET", "/who?x=1")
        self.assertEqual(response.status, 200)
        self.assertEqual(
            body.decode(),
            "tiny asgi: worker 0, pid %d, startup in %d, hooks load,before,after, GET /who?x=1\n"
            % (pid, pid),
        )
        self.assertEqual(response.getheader("content-length"), str(len(body)))
        first_socket = conn.sock

        # A chunked request body, on the same (kept-alive) connection.
        response, body = request(
            conn, "POST", "/echo", body=iter([b"hello ", b"chunked ", b"world"]),
            encode_chunked=True,
        )
        self.assertEqual((response.status, body), (200, b"HELLO CHUNKED WORLD"))
        response, body = request(conn, "POST", "/echo", body=b"by length")
        self.assertEqual((response.status, body), (200, b"BY LENGTH"))
        # A streamed response: chunked.
        response, body = request(conn, "GET", "/stream")
        self.assertEqual(response.getheader("transfer-encoding"), "chunked")
        self.assertEqual(body, b"one two three")
        response, body = request(conn, "HEAD", "/who")
        self.assertEqual((response.status, body), (200, b""))
        self.assertIs(conn.sock, first_socket, "the connection was not kept alive")
        conn.close()

        # HTTP/1.0: no keep-alive unless asked, the connection closes.
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET /old HTTP/1.0\r\n\r\n")
            answer = read_to_end(s)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertIn(b"\r\nconnection: close\r\n", answer)
        self.assertTrue(answer.endswith(b"GET /old?\n"), answer)

        # Bad requests are refused without reaching the app.
        for bad, status in [
            (b"NONSENSE\r\n\r\n", b"400"),
            (b"GET / HTTP/2.0\r\n\r\n", b"505"),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"431"),
            (b"GET / HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n", b"431"),
        ]:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(bad)
                answer = read_to_end(s)
            self.assertTrue(answer.startswith(b"HTTP/1.1 " + status), (bad[:40], answer))

    def test_sigterm_finishes_requests_in_flight_and_exits_0(self):
        self.expect_ready()
        pid, out = self.start_worker(0, 1)
        idle = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        response, _ = request(idle, "GET", "/")
        self.assertEqual(response.status, 200)  # and kept alive, waiting for a request

        slow = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        slow.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        read_until(out, b"slow request started")
        os.kill(pid, signal.SIGTERM)
        read_until(out, b"hatchery_zygote: stopping")
        # The idle connection is closed; the one in flight is still served.
        self.assertEqual(read_to_end(idle.sock), b"")
        idle.close()
        slow.sendall(b"hello")
        answer = read_to_end(slow)
        slow.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        self.assertIn(b"\r\nconnection: close\r\n", answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nHELLO"), answer)
        read_until(out, b"lifespan shutdown")
        self.assertEqual(wait_exit_code(pid), 0)
        os.close(out)


class AsgiWithoutLifespanTest(ZygoteTestCase):
    ARGS = ["tiny_asgi:no_lifespan", "--interface", "asgi"]

    def test_an_app_without_lifespan_is_served(self):
        self.expect_ready()
        pid, out = self.start_worker(0, 1)
        read_until(out, b"serving without lifespan (the app raised ValueError('only http')")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        response, body = request(conn, "GET", "/")
        self.assertEqual((response.status, body), (204, b""))
        conn.close()
        os.kill(pid, signal.SIGTERM)
        self.assertEqual(wait_exit_code(pid), 0)
        os.close(out)


class AsgiStartupFailedTest(ZygoteTestCase):
    ARGS = ["tiny_asgi:failing_startup", "--interface", "asgi"]

    def test_a_failed_startup_exits_1_and_never_says_ready(self):
        self.expect_ready()
        pid, go, out = self.fork(0, 1)
        os.write(go, b"go\n")
        os.close(go)
        read_until(out, b"lifespan startup failed: no database")
        self.assertEqual(wait_exit_code(pid), 1)
        self.assertFalse(readable(self.notify, 0), "READY=1 from a worker that failed")
        os.close(out)


class CallableTest(ZygoteTestCase):
    ARGS = ["tiny_callable:main", "--interface", "callable", "--hooks", "tiny_hooks"]

    def test_the_app_is_called_with_the_sockets_and_its_result_is_the_exit_code(self):
        self.expect_ready()
        pid, out = self.start_worker(3, 1)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            answer = read_to_end(s)
        self.assertEqual(answer, b"callable: worker 3, pid %d, 1 socket(s)\n" % pid)
        self.assertEqual(wait_exit_code(pid), 7)
        self.assertEqual(self.hook_lines()[:2], ["load %d" % self.zygote, "before %d" % self.zygote])
        # The zygote's hook for its next spare may come before or after the worker's.
        self.assertEqual(
            [l for l in self.hook_lines() if l.startswith("after")], ["after %d" % pid]
        )
        os.close(out)


class CallableWithServerTest(ZygoteTestCase):
    ARGS = ["tiny_callable:main", "--interface", "callable", "--server", "x:y"]

    def test_server_with_callable_is_a_usage_error(self):
        self.assertEqual(wait_exit_code(self.zygote), 2)
        self.assertIn(b"--server does not apply", os.read(self.stderr_r, 4096))


if __name__ == "__main__":
    unittest.main()
