"""The zygote's side of the protocol: READY, then FORK requests served by a double fork.

To answer a FORK at once, the zygote keeps one worker forked ahead (a *spare*): just
before READY, and right after each FORK it answered, it forks the next one, which waits,
already the agent's child and running no application code, for its slot and output fds
(on a socket of its own) and then for its go. To an agent of version 3 it says ``SPARE
<pid>`` (after READY, for the first), so that the agent moves the spare into its cgroup
leaf before the FORK that takes it. A FORK gives the spare its slot and the FORK's output
fds and answers ``FORKED`` with the spare's pid and go pipe. Without a spare (a hook or
the fork failed, or the spare died) the FORK forks on demand.

Each fork, in order:

0. Call ``before_fork()`` if given (the hooks' closeASAP step: close the database
   connections and other fds the zygote opened since the last fork), then ``gc.freeze()``
   whatever the zygote allocated since (a list splice, no collection). A hook that
   raises fails this FORK (``FAILED``) when forking on demand (a spare is not made), not
   the zygote.
1. Create the go pipe and a pipe for the worker's pid; block the stop signals so that
   none is handled by a half-made child.
2. Fork the intermediate child, which forks the worker, writes its pid and ``_exit(0)``s.
3. The zygote reads the worker's pid from the intermediate, without waiting for the
   intermediate's exit (reaped later): once it has exited, the worker is re-parented to
   the agent (a child subreaper) and is the agent's own child; the agent accepts it
   meanwhile as the child of the zygote's child. (On demand: answer ``FORKED <request>
   <pid>`` with the go pipe's write end, and close our copies of it and of the output
   pipe.)
4. The worker closes the link and the write end of the go pipe (a spare first receives
   its slot and output pipe; at end of file it ``_exit(1)``s), and waits for exactly
   ``go\\n``; on anything else (end of file: the agent refused it or died) it
   ``_exit(1)``s without running application code. After ``go``: default signal
   handlers, the mask restored, ``HATCHERY_WORKER_ID`` and ``LISTEN_PID`` set, the first
   output fd as stdout and the second (or the first, if it came alone) as stderr, then
   ``worker(slot)``, and ``_exit`` with its result.

The zygote returns from ``serve`` when the link reaches end of file.
"""

import gc
import os
import signal
import socket
import struct
import sys
import traceback

from .protocol import (
    GO,
    MAX_MESSAGE_BYTES,
    Failed,
    Fork,
    Forked,
    ProtocolError,
    Ready,
    PROTOCOL_ENV,
    Spare,
    SPARE_VERSION,
    format_message,
    parse_to_zygote,
    version_to_say,
)

ZYGOTE_FD_ENV = "HATCHERY_ZYGOTE_FD"
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}


def inherited_link():
    """The zygote's end of the link (a socket, close-on-exec), or None if not a zygote."""
    value = os.environ.get(ZYGOTE_FD_ENV)
    if value is None:
        return None
    if not value.isdigit():
        raise ValueError("bad %s %r" % (ZYGOTE_FD_ENV, value))
    fd = int(value)
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


def _send(link, message, fds=()):
    data = format_message(message)
    if fds:
        socket.send_fds(link, [data], list(fds))
    else:
        link.send(data)


def serve(link, worker, before_fork=None):
    """Sends READY (version 3, or the agent's if lower) and serves FORK requests until
    the link's end of file.

    ``before_fork()``, if given, runs in the zygote right before each fork.
    ``worker(slot)`` runs in each worker after its go; its return value (an int) is the
    worker's exit status. It never returns here.
    """
    try:
        _serve(link, worker, before_fork)
    except (BrokenPipeError, ConnectionResetError):
        # The agent closed the link while we sent (a SPARE, an answer): the end, as at
        # end of file.
        return


def _serve(link, worker, before_fork):
    version = version_to_say()
    # The first spare before READY: a ready zygote answers its first FORK at once.
    spare = _make_spare(link, worker, before_fork)
    _send(link, Ready(version))
    if spare is not None and version >= SPARE_VERSION:
        _send(link, Spare(spare.pid))
    while True:
        _reap_intermediates()
        if spare is None:
            spare = _make_spare(link, worker, before_fork)
            if spare is not None and version >= SPARE_VERSION:
                _send(link, Spare(spare.pid))
        data, fds, flags, _addr = socket.recv_fds(link, MAX_MESSAGE_BYTES + 1, 4)
        if not data and not fds:
            return
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ProtocolError("truncated message (too long, or too many fds)")
            request = parse_to_zygote(data)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        assert isinstance(request, Fork)
        if len(fds) not in (1, 2):
            for fd in fds:
                os.close(fd)
            _send(link, Failed(request.request, "FORK needs 1 or 2 fds, got %d" % len(fds)))
            continue
        # The worker's stdout, and its stderr if it came apart (else the same).
        outputs = list(fds)
        answer = None
        if spare is not None:
            answer, spare = spare.assign(request.slot, outputs), None
        if answer is None:
            # No spare (a hook or a fork failed, or it died): fork now.
            answer = _fork_now(link, worker, before_fork, request, outputs)
        else:
            for fd in outputs:
                os.close(fd)
        if answer is None:
            continue
        pid, go = answer
        try:
            _send(link, Forked(request.request, pid), [go])
        finally:
            os.close(go)


class _Spare:
    """A worker forked ahead of its ``FORK``: already the agent's child, blocked until it
    is given its slot and output fds (on ``channel``), then until its go."""

    def __init__(self, pid, go, channel):
        self.pid = pid
        self.go = go
        self.channel = channel

    def assign(self, slot, outputs):
        """Gives it its slot and output fds (stdout's, and stderr's if apart); ``(pid,
        go)``, or None if it is gone (its go pipe closed: it exits 1, if it still runs)."""
        try:
            socket.send_fds(self.channel, [b"%d" % slot], outputs)
            return self.pid, self.go
        except OSError:
            os.close(self.go)
            return None
        finally:
            self.channel.close()


def _make_spare(link, worker, before_fork):
    """Forks the next worker before it is asked for, so that a ``FORK`` is answered at
    once; None (the next ``FORK`` forks on demand) if a hook or the fork fails."""
    if before_fork is not None:
        try:
            before_fork()
        except Exception:
            traceback.print_exc()
            return None
    gc.freeze()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid, go = _fork_worker(link, theirs, None, worker, close_in_child=ours)
    except OSError:
        traceback.print_exc()
        ours.close()
        return None
    finally:
        theirs.close()
    return _Spare(pid, go, ours)


def _fork_now(link, worker, before_fork, request, outputs):
    """Forks the worker of ``request`` now (``outputs``: its stdout's fd, and its
    stderr's if apart); ``(pid, go)``, or None once ``FAILED`` is sent."""
    try:
        if before_fork is not None:
            try:
                before_fork()
            except Exception as e:
                traceback.print_exc()
                _send(link, Failed(request.request, "before_fork hook failed: %r" % (e,)))
                return None
        gc.freeze()
        try:
            return _fork_worker(link, outputs, request.slot, worker)
        except OSError as e:
            _send(link, Failed(request.request, "fork failed: %s" % e))
            return None
    finally:
        for fd in outputs:
            os.close(fd)


def _fork_worker(link, output, slot, worker, close_in_child=None):
    """The double fork; ``(pid, go)``. ``output`` is the list of the worker's output fds
    (stdout's, and stderr's if apart), or with ``slot`` None (a spare) the socket its slot
    and output fds will come on."""
    go_read, go_write = os.pipe()
    pid_read, pid_write = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        intermediate = os.fork()
        if intermediate == 0:
            code = 1
            try:
                os.close(pid_read)
                pid = os.fork()
                if pid == 0:
                    os.close(pid_write)
                    if close_in_child is not None:
                        close_in_child.close()
                    _worker_child(link, output, go_read, go_write, slot, worker, old_mask)
                os.write(pid_write, struct.pack("=i", pid))
                code = 0
            finally:
                os._exit(code)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(pid_write)
    os.close(go_read)
    try:
        # The pid as soon as the worker exists (end of file: the intermediate failed).
        # The intermediate is not waited for: tearing down its copy of a large heap takes
        # longer than a fork, and the agent accepts a worker whose parent is still our
        # child; the worker is re-parented to the agent once that exits.
        data = os.read(pid_read, 4)
    finally:
        os.close(pid_read)
        _intermediates.append(intermediate)
    if len(data) != 4:
        os.close(go_write)
        raise OSError("the intermediate child exited without forking the worker")
    return struct.unpack("=i", data)[0], go_write


# Intermediate children not reaped yet.
_intermediates = []


def _reap_intermediates():
    """Reaps the intermediate children that have exited (without waiting)."""
    for pid in list(_intermediates):
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _intermediates.remove(pid)


def _worker_child(link, output, go_read, go_write, slot, worker, old_mask):
    """The worker after the second fork: never returns."""
    code = 1
    try:
        # A process group of its own, as every worker the agent starts: without cgroups
        # the agent kills a worker's tree by its group, and the kernel's SIGHUP to a group
        # left orphaned with a stopped process in it (a dying agent's) reaches no other.
        os.setpgid(0, 0)
        link.close()
        os.close(go_write)
        if slot is None:
            # A spare: its slot and output fds first (end of file: the zygote is gone).
            channel = output
            data, fds, _flags, _addr = socket.recv_fds(channel, 32, 2)
            channel.close()
            if not data or len(fds) not in (1, 2) or not data.isdigit():
                os._exit(1)
            slot, output = int(data), list(fds)
        got = b""
        while len(got) < len(GO):
            chunk = os.read(go_read, len(GO) - len(got))
            if not chunk:
                break
            got += chunk
        if got != GO:
            os._exit(1)
        os.close(go_read)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.environ["HATCHERY_WORKER_ID"] = str(slot)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ.pop(ZYGOTE_FD_ENV, None)
        os.environ.pop(PROTOCOL_ENV, None)
        os.environ.pop("LISTEN_PIDFDID", None)
        sys.stdout.flush()
        sys.stderr.flush()
        # Stdout's fd, and stderr's (the same one from an agent that sent one).
        os.dup2(output[0], 1)
        os.dup2(output[-1], 2)
        for fd in output:
            os.close(fd)
        result = worker(slot)
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
