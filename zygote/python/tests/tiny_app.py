"""A tiny WSGI app for the tests: says who answered."""

import os
import sys


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/both":
        # A line on each stream.
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
    if environ.get("PATH_INFO") == "/slow":
        # In flight until its body comes, and says so (on the worker's output pipe).
        print("slow request started", flush=True)
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    hooks = sys.modules.get("tiny_hooks")
    body = "tiny app: worker %s, pid %d, generation %s, hooks %s\n" % (
        os.environ.get("HATCHERY_WORKER_ID"),
        os.getpid(),
        os.environ.get("HATCHERY_GENERATION"),
        ",".join(hooks.calls) if hooks else "-",
    )
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
