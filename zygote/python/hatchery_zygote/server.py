"""What a worker runs after its go: readiness on NOTIFY_SOCKET and a small threaded WSGI
server on the listeners inherited at fd 3.. (LISTEN_FDS), stopped gracefully by SIGTERM.

The built-in server is wsgiref's, one thread per connection: enough for tests and small
sites. A real server plugs in with ``--server module:function``, called as
``function(app, sockets)`` (see README.md).
"""

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


class _Handler(WSGIRequestHandler):
    def address_string(self):
        return self.client_address[0] if self.client_address else "-"


class ThreadedWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """wsgiref's server on an already bound and listening socket, a thread per
    connection; ``server_close`` waits for the requests in flight."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, sock, app):
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
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


def serve_wsgi(app, sockets):
    """Serves ``app`` on every listener in ``sockets`` until SIGTERM: then stops accepting,
    finishes the requests in flight, and returns.

    One loop waits, without a timeout, for a listener to be readable or for the stop
    pipe that the SIGTERM handler writes to (socketserver's own serve_forever wakes every
    poll_interval to look at its shutdown flag)."""
    servers = [ThreadedWSGIServer(sock, app) for sock in sockets]
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def stop(_signum, _frame):
        os.write(stop_w, b"x")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(stop_r, selectors.EVENT_READ)
            for server in servers:
                selector.register(server.socket, selectors.EVENT_READ, server)
            while True:
                ready = selector.select()
                if any(key.fd == stop_r for key, _ in ready):
                    print("hatchery_zygote: stopping", file=sys.stderr, flush=True)
                    break
                for key, _ in ready:
                    # Accepts one connection (or none: another worker took it) and
                    # hands it to a thread.
                    key.data._handle_request_noblock()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for server in servers:
            server.server_close()  # joins the request threads (block_on_close)
        os.close(stop_r)
        os.close(stop_w)
