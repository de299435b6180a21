"""A full round trip: this test plays the agent (a child subreaper, over a socketpair with
send_fds) against ``python -m hatchery_zygote tiny_app:app``."""

import ctypes
import http.client
import os
import select
import signal
import socket
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from hatchery_zygote.protocol import (  # noqa: E402
    GO,
    Fork,
    Forked,
    Ready,
    format_message,
    parse_to_agent,
)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def readable(fd, timeout):
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def read_until(fd, needle, timeout=10):
    text = b""
    while needle not in text:
        if not readable(fd, timeout):
            raise AssertionError("no %r in the output: %r" % (needle, text))
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError("end of output without %r: %r" % (needle, text))
        text += chunk
    return text


def parent_of(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class RoundTripTest(unittest.TestCase):
    def setUp(self):
        become_subreaper()
        self.dir = tempfile.TemporaryDirectory()
        self.notify_path = os.path.join(self.dir.name, "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.link, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.update(
            LISTEN_FDS="1",
            HATCHERY_ZYGOTE_FD="4",
            NOTIFY_SOCKET=self.notify_path,
            HATCHERY_GENERATION="5",
            PYTHONPATH=os.pathsep.join([ROOT, HERE]),
        )
        env.pop("LISTEN_PID", None)
        argv = [sys.executable, "-m", "hatchery_zygote", "tiny_app:app", "--hooks", "tiny_hooks"]
        pid = os.fork()
        if pid == 0:
            try:
                # Above 4 first, so that placing one cannot close the other.
                listener = os.dup(self.listener.fileno())
                link = os.dup(zygote_end.fileno())
                high_l = os.dup2(listener, 10, inheritable=False)
                high_z = os.dup2(link, 11, inheritable=False)
                os.dup2(high_l, 3)
                os.dup2(high_z, 4)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.zygote = pid
        zygote_end.close()

    def tearDown(self):
        self.link.close()
        self.notify.close()
        self.listener.close()
        self.dir.cleanup()
        try:
            os.kill(self.zygote, signal.SIGKILL)
            os.waitpid(self.zygote, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

    def fork(self, slot, request):
        out_r, out_w = os.pipe()
        socket.send_fds(self.link, [format_message(Fork(slot, request))], [out_w])
        os.close(out_w)
        self.assertTrue(readable(self.link, 10), "no answer to FORK")
        data, fds, _, _ = socket.recv_fds(self.link, 513, 4)
        answer = parse_to_agent(data)
        self.assertEqual(answer, Forked(request, answer.pid))
        self.assertEqual(len(fds), 1)
        return answer.pid, fds[0], out_r

    def test_round_trip(self):
        self.assertTrue(readable(self.link, 30), "no READY")
        self.assertEqual(parse_to_agent(self.link.recv(513)), Ready(1))

        pid, go, out = self.fork(0, 1)
        self.assertEqual(parent_of(pid), os.getpid())
        self.assertFalse(readable(out, 0), "output before the go")
        os.write(go, GO)
        os.close(go)
        self.notify.settimeout(10)
        self.assertEqual(self.notify.recv(64), b"READY=1")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
        conn.close()
        self.assertIn("tiny app: worker 0, pid %d, generation 5, hooks before,after" % pid, body)

        refused, go1, out1 = self.fork(1, 2)
        os.close(go1)
        _, status = os.waitpid(refused, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 1)
        self.assertEqual(os.read(out1, 64), b"")
        os.close(out1)

        self.link.close()
        _, status = os.waitpid(self.zygote, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)

        read_until(out, b"worker 0 (pid %d) serving" % pid)
        # SIGTERM with a request in flight: it is answered, then the worker exits 0.
        slow = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        slow.sendall(b"GET /slow HTTP/1.0\r\n\r\n")
        read_until(out, b"slow request started")
        os.kill(pid, signal.SIGTERM)
        answer = b""
        while True:
            chunk = slow.recv(4096)
            if not chunk:
                break
            answer += chunk
        slow.close()
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        os.close(out)


if __name__ == "__main__":
    unittest.main()
