"""Tiny ASGI apps for the tests."""

import os
import sys


async def app(scope, receive, send):
    """Supports lifespan (records where startup ran); answers who it is, echoes bodies
    in upper case, streams, and has a /slow request that waits for its body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["startup_pid"] = os.getpid()
                print("lifespan startup in %d" % os.getpid(), flush=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                print("lifespan shutdown", flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        print("slow request started", flush=True)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] in ("/echo", "/slow"):
        text = body.upper()
    else:
        hooks = sys.modules.get("tiny_hooks")
        text = (
            "tiny asgi: worker %s, pid %d, startup in %s, hooks %s, %s %s?%s\n"
            % (
                os.environ.get("HATCHERY_WORKER_ID"),
                os.getpid(),
                scope["state"].get("startup_pid"),
                ",".join(hooks.calls) if hooks else "-",
                scope["method"],
                scope["path"],
                scope["query_string"].decode(),
            )
        ).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
    )
    await send({"type": "http.response.body", "body": text})


async def no_lifespan(scope, receive, send):
    """An app that does not support lifespan: raises on it, as many do."""
    if scope["type"] != "http":
        raise ValueError("only http")
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body"})


async def failing_startup(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})
