"""A small ASGI 3 server for the worker: asyncio, HTTP/1.1, standard library only, on the
listeners inherited at fd 3.. (all of them, TCP or Unix).

It serves, in order:

1. The ``lifespan`` scope, if the app supports it: ``lifespan.startup`` runs here, in the
   worker after its go, never in the zygote (a connection pool made at startup belongs to
   one process). ``lifespan.startup.failed`` makes the worker exit 1; an app that raises
   or returns before answering startup is taken not to support lifespan (as uvicorn's
   ``--lifespan auto``), and is served without it.
2. ``ready()`` (READY=1 to NOTIFY_SOCKET), once every listener is being served.
3. The ``http`` scope: HTTP/1.0 and 1.1, keep-alive, request bodies by Content-Length or
   chunked (streamed to ``receive``), responses framed by the app's Content-Length, by a
   Content-Length of the one body message, by chunked encoding (1.1) or by closing (1.0).
   The lifespan ``state`` is copied shallowly into each request's scope.
4. On SIGTERM (or SIGINT): stop accepting, close the connections that wait for a request,
   finish the requests in flight (their responses say ``Connection: close``), send
   ``lifespan.shutdown``, return. The agent's stop deadline bounds all of this.

Limits on what a client controls: 1000 connections per worker (more are answered 503
and closed), a request head of at most 64 KiB and 100 header lines, 60 s to send one
(also the keep-alive idle time), 60 s for each read of the body (a client that stalls
longer is taken to have left), chunk-size lines within the head limit. A request with both Content-Length and Transfer-Encoding is refused (400), as are
transfer codings other than chunked (501).

It does not serve websockets (an upgrade request is an ordinary ``http`` request), HTTP/2
or TLS, and does not notice a client that leaves while the app has not yet answered (it
notices when writing the answer fails). ``--server module:function`` plugs a real server
in (see README.md).
"""

import asyncio
import email.utils
import signal
import socket
import sys
import traceback
from http import HTTPStatus
from urllib.parse import unquote

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_CONNECTIONS = 1000
HEAD_TIMEOUT_S = 60.0
BODY_TIMEOUT_S = 60.0
READ_CHUNK_BYTES = 64 * 1024
ASGI = {"version": "3.0", "spec_version": "2.3"}


class LifespanFailed(Exception):
    """The app answered ``lifespan.startup.failed`` or ``lifespan.shutdown.failed``."""


class _BadRequest(Exception):
    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


def serve_asgi(app, sockets, ready=None):
    """Serves ``app`` on ``sockets`` until SIGTERM or SIGINT, then returns 0; returns 1 if
    the app's lifespan startup or shutdown failed."""
    try:
        asyncio.run(_serve(app, sockets, ready))
    except LifespanFailed as e:
        print("hatchery_zygote: %s" % e, file=sys.stderr, flush=True)
        return 1
    return 0


async def _serve(app, sockets, ready):
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    state = {}
    lifespan = await _Lifespan.start(app, state)
    server = _HttpServer(app, state)
    listeners = []
    for sock in sockets:
        # Other workers accept from the same socket: asyncio never blocks in accept.
        if sock.family == socket.AF_UNIX:
            listener = await asyncio.start_unix_server(
                server.connection, sock=sock, limit=MAX_HEAD_BYTES
            )
        else:
            listener = await asyncio.start_server(
                server.connection, sock=sock, limit=MAX_HEAD_BYTES
            )
        listeners.append(listener)
    if ready is not None:
        ready()
    await stop.wait()
    print("hatchery_zygote: stopping", file=sys.stderr, flush=True)
    for listener in listeners:
        listener.close()
    await server.finish()
    if lifespan is not None:
        await lifespan.shutdown()


async def _first(queue, task):
    """The next message the app sends, or None if the app returned or raised first."""
    get = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return None


class _Lifespan:
    def __init__(self, to_app, from_app, task):
        self.to_app = to_app
        self.from_app = from_app
        self.task = task

    @classmethod
    async def start(cls, app, state):
        """Runs ``lifespan.startup``; None if the app does not support lifespan."""
        to_app, from_app = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": dict(ASGI), "state": state}
        task = asyncio.ensure_future(app(scope, to_app.get, from_app.put))
        await to_app.put({"type": "lifespan.startup"})
        message = await _first(from_app, task)
        if message is None:
            error = task.exception() if not task.cancelled() else None
            print(
                "hatchery_zygote: serving without lifespan (the app %s on the lifespan scope)"
                % ("raised %r" % (error,) if error is not None else "returned"),
                file=sys.stderr,
                flush=True,
            )
            return None
        if message.get("type") == "lifespan.startup.failed":
            raise LifespanFailed("lifespan startup failed: %s" % message.get("message", ""))
        if message.get("type") != "lifespan.startup.complete":
            raise LifespanFailed("unexpected lifespan message %r" % (message.get("type"),))
        return cls(to_app, from_app, task)

    async def shutdown(self):
        await self.to_app.put({"type": "lifespan.shutdown"})
        message = await _first(self.from_app, self.task)
        if message is None and not self.task.cancelled() and self.task.exception() is not None:
            raise LifespanFailed("lifespan shutdown raised %r" % (self.task.exception(),))
        if message is not None and message.get("type") == "lifespan.shutdown.failed":
            raise LifespanFailed("lifespan shutdown failed: %s" % message.get("message", ""))


class _HttpServer:
    def __init__(self, app, state):
        self.app = app
        self.state = state
        self.stopping = False
        self.connections = set()
        self.idle = set()

    async def finish(self):
        """Closes idle connections and waits for the requests in flight."""
        self.stopping = True
        # Let connections accepted just before the stop register themselves.
        await asyncio.sleep(0)
        for task in list(self.idle):
            task.cancel()
        while self.connections:
            await asyncio.wait(set(self.connections))

    async def connection(self, reader, writer):
        task = asyncio.current_task()
        if len(self.connections) >= MAX_CONNECTIONS:
            await _simple_response(writer, 503, "too many connections")
            writer.close()
            return
        self.connections.add(task)
        try:
            keep_alive = True
            while keep_alive and not self.stopping:
                self.idle.add(task)
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
                except asyncio.LimitOverrunError:
                    await _simple_response(writer, 431, "request head too large")
                    return
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                finally:
                    self.idle.discard(task)
                try:
                    exchange = _Exchange(self, _parse_head(head), reader, writer)
                except _BadRequest as e:
                    await _simple_response(writer, e.status, str(e))
                    return
                keep_alive = await exchange.run()
        except asyncio.CancelledError:
            pass  # stopped while waiting for a request
        except ConnectionError:
            pass
        finally:
            self.connections.discard(task)
            writer.close()


def _parse_head(head):
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _BadRequest(400, "bad request line")
    method, target, version = parts
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _BadRequest(505, "HTTP version not supported")
    if len(lines) - 1 > MAX_HEADERS:
        raise _BadRequest(431, "too many header lines")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise _BadRequest(400, "bad header line")
        headers.append((name.lower(), value.strip(b" \t")))
    if target.startswith((b"http://", b"https://")):
        # absolute-form: keep the path and query
        slash = target.find(b"/", target.find(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    raw_path, _, query = target.partition(b"?")
    return {
        "method": method.decode("ascii", "replace").upper(),
        "http_version": version[5:].decode("ascii"),
        "raw_path": raw_path,
        "path": unquote(raw_path.decode("latin-1"), encoding="utf-8", errors="replace"),
        "query_string": query,
        "headers": headers,
    }


def _header(headers, name):
    return [v for n, v in headers if n == name]


def _address(address):
    if isinstance(address, tuple) and len(address) >= 2:
        return [address[0], address[1]]
    return None


async def _simple_response(writer, status, text):
    body = (text + "\n").encode()
    writer.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (status, HTTPStatus(status).phrase.encode(), len(body))
        + body
    )
    try:
        await writer.drain()
    except ConnectionError:
        pass


class _Exchange:
    """One request and its response on a connection."""

    def __init__(self, server, request, reader, writer):
        self.server = server
        self.request = request
        self.reader = reader
        self.writer = writer
        headers = request["headers"]
        tokens = b",".join(_header(headers, b"connection")).lower()
        tokens = {t.strip() for t in tokens.split(b",")}
        if request["http_version"] == "1.1":
            self.keep_alive = b"close" not in tokens
        else:
            self.keep_alive = b"keep-alive" in tokens
        transfer = _header(headers, b"transfer-encoding")
        length = _header(headers, b"content-length")
        if transfer and length:
            raise _BadRequest(400, "both Content-Length and Transfer-Encoding")
        if transfer:
            if [t.strip().lower() for t in b",".join(transfer).split(b",")] != [b"chunked"]:
                raise _BadRequest(501, "transfer coding not supported")
            self.chunked, self.remaining = True, 0
        else:
            self.chunked = False
            if len(set(length)) > 1 or (length and not length[0].isdigit()):
                raise _BadRequest(400, "bad Content-Length")
            self.remaining = int(length[0]) if length else 0
        self.body_done = not self.chunked and self.remaining == 0
        self.body_given = False  # the last http.request message has been received
        self.continue_expected = (
            request["http_version"] == "1.1"
            and b"100-continue" in [v.lower() for v in _header(headers, b"expect")]
        )
        self.disconnected = False
        self.response_done = asyncio.Event()
        self.started = None  # the response start message, until its head is written
        self.head_written = False
        self.response_chunked = False
        self.no_body = request["method"] == "HEAD"

    def scope(self):
        r = self.request
        return {
            "type": "http",
            "asgi": dict(ASGI),
            "http_version": r["http_version"],
            "method": r["method"],
            "scheme": "http",
            "path": r["path"],
            "raw_path": r["raw_path"],
            "query_string": r["query_string"],
            "root_path": "",
            "headers": r["headers"],
            "client": _address(self.writer.get_extra_info("peername")),
            "server": _address(self.writer.get_extra_info("sockname")),
            "state": dict(self.server.state),
        }

    async def run(self):
        """Runs the app on this request; whether the connection may serve another."""
        try:
            await self.server.app(self.scope(), self.receive, self.send)
        except Exception:
            traceback.print_exc()
            if not self.head_written and not self.disconnected:
                self.keep_alive = False
                await _simple_response(self.writer, 500, "internal server error")
            return False
        finally:
            self.response_done.set()
        if self.disconnected:
            return False
        if not self.head_written:
            print("hatchery_zygote: the app returned without a response", file=sys.stderr)
            await _simple_response(self.writer, 500, "internal server error")
            return False
        if self.started is not None or not self.response_complete:
            return False  # an unfinished response: the connection cannot be reused
        return self.keep_alive and self.body_done and not self.server.stopping

    # receive: the request body, then http.disconnect once the response is sent.

    async def receive(self):
        if self.body_done and not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.body_done or self.disconnected:
            await self.response_done.wait()
            return {"type": "http.disconnect"}
        if self.continue_expected:
            self.continue_expected = False
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await asyncio.wait_for(
                self._read_chunked() if self.chunked else self._read_length(), BODY_TIMEOUT_S
            )
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            asyncio.TimeoutError,
            ConnectionError,
            ValueError,
        ):
            self.disconnected = True
            self.keep_alive = False
            return {"type": "http.disconnect"}
        self.body_given = self.body_done
        return {"type": "http.request", "body": body, "more_body": not self.body_done}

    async def _read_length(self):
        body = await self.reader.read(min(self.remaining, READ_CHUNK_BYTES))
        if not body:
            raise ConnectionError("the client closed the connection within the body")
        self.remaining -= len(body)
        self.body_done = self.remaining == 0
        return body

    async def _read_chunked(self):
        if self.remaining == 0:
            line = await self.reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)  # ValueError: a bad request
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers, dropped
                self.body_done = True
                return b""
            self.remaining = size
        body = await self.reader.read(min(self.remaining, READ_CHUNK_BYTES))
        if not body:
            raise ConnectionError("the client closed the connection within the body")
        self.remaining -= len(body)
        if self.remaining == 0 and await self.reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        return body

    # send: the response start is held until the first body message, so that a
    # response given in one message gets a Content-Length.

    response_complete = False

    async def send(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            if self.started is not None or self.head_written:
                raise RuntimeError("http.response.start sent twice")
            self.started = message
        elif kind == "http.response.body":
            if self.started is None:
                raise RuntimeError("http.response.body before http.response.start")
            if self.response_complete:
                raise RuntimeError("http.response.body after the last one")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.disconnected:
                return
            out = []
            if not self.head_written:
                out.append(self._head(len(body) if not more else None))
            if body and not self.no_body:
                out.append(b"%x\r\n%s\r\n" % (len(body), body) if self.response_chunked else body)
            if not more:
                if self.response_chunked:
                    out.append(b"0\r\n\r\n")
                self.response_complete = True
                self.started = None
            self.writer.write(b"".join(out))
            try:
                await self.writer.drain()
            except ConnectionError:
                self.disconnected = True
            if not more:
                self.response_done.set()
        else:
            raise RuntimeError("unexpected ASGI message %r" % (kind,))

    def _head(self, single_body_length):
        start = self.started
        status = int(start["status"])
        headers = []
        has_length = False
        for name, value in start.get("headers", []):
            name = bytes(name).lower()
            value = bytes(value)
            if any(c in name + value for c in b"\r\n\0"):
                raise RuntimeError("a response header with CR, LF or NUL")
            if name == b"content-length":
                has_length = True
            if name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
            if name in (b"connection", b"transfer-encoding"):
                continue  # framing is the server's
            headers.append((name, value))
        bodiless = self.no_body or status < 200 or status in (204, 304)
        if self.server.stopping:
            self.keep_alive = False
        if not has_length and not bodiless:
            if single_body_length is not None:
                headers.append((b"content-length", b"%d" % single_body_length))
            elif self.request["http_version"] == "1.1":
                self.response_chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_alive = False  # the body ends when the connection does
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        elif self.request["http_version"] == "1.0":
            headers.append((b"connection", b"keep-alive"))
        headers.append((b"date", email.utils.formatdate(usegmt=True).encode()))
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        self.head_written = True
        if bodiless:
            self.no_body = True
        lines = [b"HTTP/1.1 %d %s" % (status, phrase)]
        lines += [b"%s: %s" % (n, v) for n, v in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"
