"""Plays the agent against the real zygote: a child subreaper that starts
``python -m hatchery_zygote ...`` with the link (a SOCK_SEQPACKET socketpair) at fd 4, a
loopback listener at fd 3 and NOTIFY_SOCKET, and sends FORK requests with send_fds.
Every wait is for an event, bounded by a timeout."""

import ctypes
import fcntl
import os
import time
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
    PROTOCOL_VERSION,
    Fork,
    Forked,
    Ready,
    Spare,
    format_message,
    parse_to_agent,
)

PR_SET_CHILD_SUBREAPER = 36
TIMEOUT_S = 10


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def readable(fd, timeout):
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def read_until(fd, needle, timeout=TIMEOUT_S):
    text = b""
    while needle not in text:
        if not readable(fd, timeout):
            raise AssertionError("no %r in the output: %r" % (needle, text))
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError("end of output without %r: %r" % (needle, text))
        text += chunk
    return text


def read_to_end(sock):
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def parent_of(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_exit_code(pid, timeout=TIMEOUT_S):
    """The exit code of our child ``pid``, waiting for it on a pidfd (bounded)."""
    fd = os.pidfd_open(pid)
    try:
        if not readable(fd, timeout):
            raise AssertionError("pid %d still running after %d s" % (pid, timeout))
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class ZygoteTestCase(unittest.TestCase):
    """Starts the zygote with ``ARGS`` in setUp, as an agent of version ``AGENT_VERSION``
    (None: one that does not say its version); kills what is left in tearDown."""

    ARGS = []
    AGENT_VERSION = PROTOCOL_VERSION

    def setUp(self):
        become_subreaper()
        self.workers = []
        # The pids of the SPAREs received, in order.
        self.spares = []
        self.dir = tempfile.TemporaryDirectory()
        self.notify_path = os.path.join(self.dir.name, "notify")
        self.hooks_log = os.path.join(self.dir.name, "hooks.log")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(TIMEOUT_S)
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
            HOOKS_LOG=self.hooks_log,
            PYTHONPATH=os.pathsep.join([ROOT, HERE]),
        )
        env.pop("LISTEN_PID", None)
        env.pop("HATCHERY_ZYGOTE_PROTOCOL", None)
        if self.AGENT_VERSION is not None:
            env["HATCHERY_ZYGOTE_PROTOCOL"] = str(self.AGENT_VERSION)
        argv = [sys.executable, "-m", "hatchery_zygote"] + list(self.ARGS)
        self.stderr_r, stderr_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.dup2(stderr_w, 2)
                # Above 4 first, so that placing one cannot close the other.
                high_l = fcntl.fcntl(self.listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 5)
                high_z = fcntl.fcntl(zygote_end.fileno(), fcntl.F_DUPFD_CLOEXEC, 5)
                os.dup2(high_l, 3)
                os.dup2(high_z, 4)
                os.execve(sys.executable, argv, env)
            except BaseException as e:
                os.write(2, ("harness: cannot start the zygote: %r\n" % (e,)).encode())
            finally:
                os._exit(127)
        os.close(stderr_w)
        self.zygote = pid
        zygote_end.close()

    def tearDown(self):
        self.link.close()
        self.notify.close()
        self.listener.close()
        self.dir.cleanup()
        os.close(self.stderr_r)
        for pid in [self.zygote] + self.workers:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass

    def expect_ready(self):
        self.assertTrue(readable(self.link, 30), "no READY")
        said = min(PROTOCOL_VERSION, self.AGENT_VERSION or 2)
        self.assertEqual(parse_to_agent(self.link.recv(513)), Ready(said))

    def receive(self, skip_spares=True):
        """The next message and its fds (bounded wait); SPAREs are recorded in
        ``self.spares`` and skipped unless ``skip_spares`` is false."""
        while True:
            self.assertTrue(readable(self.link, TIMEOUT_S), "nothing from the zygote")
            data, fds, _, _ = socket.recv_fds(self.link, 513, 4)
            message = parse_to_agent(data)
            if isinstance(message, Spare):
                self.assertEqual(fds, [])
                self.spares.append(message.pid)
                self.workers.append(message.pid)
                if skip_spares:
                    continue
            return message, fds

    def fork(self, slot, request, errors_w=None):
        """Sends FORK; the worker's pid, its go pipe and its output (read end). With
        ``errors_w``, that is sent as the worker's stderr (the FORK has two fds)."""
        out_r, out_w = os.pipe()
        fds = [out_w] if errors_w is None else [out_w, errors_w]
        socket.send_fds(self.link, [format_message(Fork(slot, request))], fds)
        os.close(out_w)
        answer, fds = self.receive()
        self.assertEqual(answer, Forked(request, answer.pid))
        self.assertEqual(len(fds), 1)
        self.workers.append(answer.pid)
        return answer.pid, fds[0], out_r

    def start_worker(self, slot, request, errors_w=None):
        """Forks a worker (its stderr ``errors_w`` if given) and says go; returns after its
        READY=1."""
        pid, go, out = self.fork(slot, request, errors_w)
        # Ours, once the zygote's intermediate child has exited (the zygote answers
        # without waiting for that).
        deadline = time.monotonic() + TIMEOUT_S
        while parent_of(pid) != os.getpid() and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertEqual(parent_of(pid), os.getpid())
        self.assertFalse(readable(out, 0), "output before the go")
        os.write(go, b"go\n")
        os.close(go)
        self.assertEqual(self.notify.recv(64), b"READY=1")
        return pid, out

    def wait_hook_lines(self, expected):
        """Waits (at most TIMEOUT_S) until the hooks log is ``expected``; fails if it
        is not then."""
        deadline = time.monotonic() + TIMEOUT_S
        while self.hook_lines() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.hook_lines(), expected)

    def hook_lines(self):
        try:
            with open(self.hooks_log) as f:
                return f.read().split("\n")[:-1]
        except FileNotFoundError:
            return []
