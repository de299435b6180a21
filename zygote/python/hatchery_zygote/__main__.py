"""``python -m hatchery_zygote module:app [--server wsgi|module:function] [--hooks module]``

Loads the WSGI application once (with the garbage collector off), runs the hooks
module's ``before_fork()`` (close database connections, stop threads), collects and
freezes the heap (``gc.collect(); gc.freeze()``), says READY on the link named by
HATCHERY_ZYGOTE_FD, and forks a worker per request. Each worker, after its go: turns the
collector back on, runs ``after_fork()``, reports READY=1 to NOTIFY_SOCKET and serves the
app on its listener at fd 3.
"""

import argparse
import gc
import importlib
import os
import random
import sys

from .server import listen_sockets, notify, serve_wsgi
from .zygote import inherited_link, serve


def _load(spec, what):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit("hatchery_zygote: %s must be module:name, not %r" % (what, spec))
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv=None):
    # No collection while loading: freed holes would be refilled after fork, and a
    # collection in a worker writes to every tracked object's header (research note §1).
    gc.disable()
    parser = argparse.ArgumentParser(prog="python -m hatchery_zygote")
    parser.add_argument("app", help="the WSGI application, as module:name")
    parser.add_argument(
        "--server",
        default="wsgi",
        help="'wsgi' (built-in threaded server) or module:function called as function(app, sockets)",
    )
    parser.add_argument("--hooks", help="a module defining before_fork() and/or after_fork()")
    args = parser.parse_args(argv)

    link = inherited_link()
    if link is None:
        raise SystemExit("hatchery_zygote: not started as a zygote (HATCHERY_ZYGOTE_FD is not set)")
    sys.path.insert(0, os.getcwd())
    app = _load(args.app, "the application")
    hooks = importlib.import_module(args.hooks) if args.hooks else None
    server = serve_wsgi if args.server == "wsgi" else _load(args.server, "--server")
    if hooks is not None and hasattr(hooks, "before_fork"):
        hooks.before_fork()
    gc.collect()
    gc.freeze()

    def worker(slot):
        gc.enable()
        random.seed()
        if hooks is not None and hasattr(hooks, "after_fork"):
            hooks.after_fork()
        sockets = listen_sockets()
        if not sockets:
            print("hatchery_zygote: no listener passed in LISTEN_FDS", file=sys.stderr)
            return 1
        notify(b"READY=1")
        print("hatchery_zygote: worker %d (pid %d) serving" % (slot, os.getpid()), flush=True)
        server(app, sockets)
        return 0

    serve(link, worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
