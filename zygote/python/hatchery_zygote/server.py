"""What a worker runs after its go: readiness on NOTIFY_SOCKET and a small WSGI server on
the listeners inherited at fd 3.. (LISTEN_FDS), stopped gracefully by SIGTERM.

The built-in server is wsgiref's, one request per connection, in one of two shapes:

- unbounded (the default): a thread per connection, so the worker accepts every
  connection at once and none waits in the kernel's accept queue;
- bounded (``threads=N``): at most N requests at once. The loop stops watching the
  listeners while all N are in use, so the next connection stays in the accept queue
  (where another worker on the same listener may take it) instead of being accepted
  without a thread to serve it. ``threads=1`` is a sync worker, as gunicorn's: the next
  connection is accepted only once the current one is answered.

With ``busy_reports`` (bounded only) the worker sends ``BUSY=1`` to NOTIFY_SOCKET when
all its threads are in use and ``BUSY=0`` when one is free again, on those transitions
only (a Hatchery extension of sd_notify: a load signal for the agent). A report that
cannot be sent is dropped; it never fails a request.

All the server's state (the count of requests in use, the reports) lives in the one loop
that waits for the listeners, the stop pipe and the pipe on which a finished request says
so; the request threads only run requests.

Enough for tests and small sites. A real server plugs in with ``--server
module:function``, called as ``function(app, sockets)`` (see README.md).
"""

import concurrent.futures
import os
import selectors
import signal
import socket
import socketserver
import sys
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

SD_LISTEN_FDS_START = 3


def listen_sockets():
    """The listeners passed to this process (LISTEN_FDS, when LISTEN_PID is us)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def notify(state):
    """Sends ``state`` (e.g. b"READY=1") to NOTIFY_SOCKET, if set ('@' = abstract)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state, path)


def notify_best_effort(state):
    """``notify``, but a report that cannot be sent (no listener on NOTIFY_SOCKET, its
    queue full, a bad path) is dropped: returns the error instead of raising it."""
    try:
        notify(state)
    except OSError as e:
        return e
    return None


class _Handler(WSGIRequestHandler):
    def address_string(self):
        return self.client_address[0] if self.client_address else "-"


class _TimedHandler(_Handler):
    # Bounded workers: a client that sends its request, or reads the answer, slower than
    # this (one socket operation at a time) is dropped rather than holding a thread.
    timeout = 60


class ListenerWSGIServer(WSGIServer):
    """wsgiref's server on an already bound and listening socket; the caller decides
    where each request runs."""

    handler_class = _TimedHandler

    def __init__(self, sock, app):
        socketserver.BaseServer.__init__(self, sock.getsockname(), self.handler_class)
        self.socket = sock
        # Other workers accept from the same socket: never block in accept.
        self.socket.setblocking(False)
        address = sock.getsockname()
        if isinstance(address, tuple):
            self.server_name, self.server_port = address[0], address[1]
        else:
            self.server_name, self.server_port = "localhost", 0
        self.setup_environ()
        self.set_app(app)

    def serve_one(self, conn, address):
        """Runs one accepted connection's request to its end (socketserver's
        ``process_request_thread``)."""
        try:
            self.finish_request(conn, address)
        except Exception:  # noqa: BLE001 - reported by socketserver, the worker goes on
            self.handle_error(conn, address)
        finally:
            self.shutdown_request(conn)


class ThreadedWSGIServer(socketserver.ThreadingMixIn, ListenerWSGIServer):
    """A thread per connection, unbounded; ``server_close`` waits for the requests in
    flight."""

    handler_class = _Handler
    daemon_threads = False
    block_on_close = True


def serve_wsgi(app, sockets, threads=None, busy_reports=False):
    """Serves ``app`` on every listener in ``sockets`` until SIGTERM: then stops accepting,
    finishes the requests in flight, and returns.

    ``threads=None`` is a thread per connection; ``threads=N`` at most N requests at once
    (1: one at a time), with ``busy_reports`` sending BUSY=1/BUSY=0 on NOTIFY_SOCKET when
    the worker becomes full and has room again.

    One loop waits, without a timeout, for a listener to be readable or for the stop
    pipe (socketserver's own serve_forever wakes every poll_interval to look at its
    shutdown flag). The pipe is Python's signal wakeup fd: the C-level handler writes the
    signal's number to it from whichever thread the kernel delivered SIGTERM to. A Python
    handler writing to it instead would run only once the main thread runs again, and the
    main thread may sleep in the selector while a request's thread took the signal."""
    if threads is not None and threads < 1:
        raise ValueError("threads must be at least 1, not %r" % (threads,))
    if busy_reports and threads is None:
        raise ValueError("busy_reports needs a bounded worker (threads=N)")
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def stop(_signum, _frame):
        pass  # the wakeup fd says it (see above)

    previous = signal.signal(signal.SIGTERM, stop)
    previous_wakeup = signal.set_wakeup_fd(stop_w, warn_on_full_buffer=False)
    try:
        if threads is None:
            _serve_unbounded(app, sockets, stop_r)
        else:
            _serve_bounded(app, sockets, stop_r, threads, busy_reports)
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGTERM, previous)
        os.close(stop_r)
        os.close(stop_w)


def _stop_asked(ready, stop_r):
    """Whether SIGTERM came: the stop pipe is readable and holds its number (other
    signals with a Python handler write theirs too, and do not stop the worker)."""
    if not any(key.fd == stop_r for key, _ in ready):
        return False
    try:
        return signal.SIGTERM in os.read(stop_r, 512)
    except BlockingIOError:
        return False


def _serve_unbounded(app, sockets, stop_r):
    servers = [ThreadedWSGIServer(sock, app) for sock in sockets]
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(stop_r, selectors.EVENT_READ)
            for server in servers:
                selector.register(server.socket, selectors.EVENT_READ, server)
            while True:
                ready = selector.select()
                if _stop_asked(ready, stop_r):
                    print("hatchery_zygote: stopping", file=sys.stderr, flush=True)
                    break
                for key, _ in ready:
                    if key.data is None:
                        continue  # the stop pipe, for another signal
                    # Accepts one connection (or none: another worker took it) and
                    # hands it to a thread.
                    key.data._handle_request_noblock()
    finally:
        for server in servers:
            server.server_close()  # joins the request threads (block_on_close)


def _serve_bounded(app, sockets, stop_r, threads, busy_reports):
    servers = [ListenerWSGIServer(sock, app) for sock in sockets]
    # A finished request writes one byte here; only the loop counts them.
    done_r, done_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    in_use = 0
    watching = False
    report_failed = False

    def report(state):
        nonlocal report_failed
        error = notify_best_effort(state)
        if error is not None and not report_failed:
            # Once: a worker whose reports fail keeps serving; saying it at every
            # transition would flood its log.
            report_failed = True
            print("hatchery_zygote: cannot send %s to NOTIFY_SOCKET (%s); serving on"
                  % (state.decode(), error), file=sys.stderr, flush=True)

    def run(server, conn, address):
        try:
            server.serve_one(conn, address)
        finally:
            os.write(done_w, b".")

    try:
        with selectors.DefaultSelector() as selector:
            selector.register(stop_r, selectors.EVENT_READ)
            selector.register(done_r, selectors.EVENT_READ)
            while True:
                # Listen only with a free thread: a connection we cannot serve stays in
                # the accept queue, for this worker later or another one now.
                if in_use < threads and not watching:
                    for server in servers:
                        selector.register(server.socket, selectors.EVENT_READ, server)
                    watching = True
                elif in_use >= threads and watching:
                    for server in servers:
                        selector.unregister(server.socket)
                    watching = False
                ready = selector.select()
                if _stop_asked(ready, stop_r):
                    print("hatchery_zygote: stopping", file=sys.stderr, flush=True)
                    break
                if any(key.fd == done_r for key, _ in ready):
                    finished = len(os.read(done_r, threads))
                    was_full = in_use >= threads
                    in_use -= finished
                    if busy_reports and was_full and in_use < threads:
                        report(b"BUSY=0")
                for key, _ in ready:
                    if key.data is None or in_use >= threads:
                        continue
                    try:
                        conn, address = key.data.get_request()
                    except (BlockingIOError, InterruptedError):
                        continue  # another worker took it
                    except OSError as e:
                        # ECONNABORTED, EMFILE, ...: this connection is lost, not the worker.
                        print("hatchery_zygote: accept failed: %s" % e, file=sys.stderr,
                              flush=True)
                        continue
                    in_use += 1
                    pool.submit(run, key.data, conn, address)
                    if busy_reports and in_use == threads:
                        report(b"BUSY=1")
    finally:
        pool.shutdown(wait=True)  # the requests in flight finish
        for server in servers:
            server.server_close()
        os.close(done_r)
        os.close(done_w)
