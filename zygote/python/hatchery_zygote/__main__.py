"""``python -m hatchery_zygote module:app [--interface wsgi|asgi|callable]
[--server builtin|module:function] [--hooks module] [--threads N] [--busy-reports]``

In the zygote: loads the application once (with the garbage collector off), runs the
hooks module's ``after_load()``, collects and freezes the heap (``gc.collect();
gc.freeze()``), says READY on the link named by HATCHERY_ZYGOTE_FD, and forks a worker
per request, running ``before_fork()`` right before each fork. Each worker, after its go:
turns the collector back on, reseeds ``random``, runs ``after_fork()``, and then, by
interface:

- ``wsgi``: reports READY=1 to NOTIFY_SOCKET and serves the app on its listeners at fd 3..
  (built-in server: a thread per connection, or at most ``--threads N`` requests at once,
  with ``--busy-reports`` sending BUSY=1/BUSY=0 when full and free again; or ``--server``);
- ``asgi``: the built-in asyncio server runs the lifespan startup, reports READY=1 and
  serves every listener; a ``--server`` is called after READY=1 like a WSGI one;
- ``callable``: reports READY=1 and calls ``app(sockets)``, which owns the serving loop;
  its return value (an int, or None for 0) is the worker's exit status.

Started without a zygote link but with listeners of its own (``LISTEN_PID`` is this
process, as in a Hatchery site in exec mode), it is a single worker: it loads the app
and runs the worker's steps above (hooks: ``after_load()`` then ``after_fork()``; no
fork).
"""

import argparse
import gc
import importlib
import inspect
import os
import random
import sys

from .asgi import serve_asgi
from .server import listen_sockets, notify, serve_wsgi
from .zygote import inherited_link, serve

INTERFACES = ("wsgi", "asgi", "callable")


def _load(spec, what):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit("hatchery_zygote: %s must be module:name, not %r" % (what, spec))
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def looks_asgi(app):
    """Whether ``app`` (a function or an object with ``__call__``) is a coroutine function,
    as every ASGI 3 application is and no WSGI one is."""
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(
        getattr(app, "__call__", None)
    )


def _hook(hooks, name):
    hook = getattr(hooks, name, None) if hooks is not None else None
    if hook is not None and not callable(hook):
        raise SystemExit("hatchery_zygote: %s.%s is not callable" % (hooks.__name__, name))
    return hook


def _parser():
    parser = argparse.ArgumentParser(prog="python -m hatchery_zygote")
    parser.add_argument("app", help="the application (or entry point), as module:name")
    parser.add_argument(
        "--interface",
        choices=INTERFACES,
        default="wsgi",
        help="how the worker runs the app: wsgi (default), asgi, or callable: app(sockets)",
    )
    parser.add_argument(
        "--server",
        default="builtin",
        help="'builtin' (default) or module:function, called in the worker as "
        "function(app, sockets); wsgi and asgi only",
    )
    parser.add_argument(
        "--hooks",
        help="a module defining any of after_load() (zygote, once), before_fork() "
        "(zygote, before each fork) and after_fork() (each worker)",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        metavar="N",
        help="built-in WSGI server: at most N requests at once, the next connection "
        "waiting in the accept queue (1: one at a time, as a sync worker); default: a "
        "thread per connection, unbounded",
    )
    parser.add_argument(
        "--busy-reports",
        action="store_true",
        help="with --threads: send BUSY=1 to NOTIFY_SOCKET when all N are in use and "
        "BUSY=0 when one is free again",
    )
    return parser


def _positive(text):
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1, not %r" % text)
    return n


def _has_own_listeners():
    """Started by a supervisor with listeners for this very process (LISTEN_PID)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and bool(os.environ.get("LISTEN_FDS"))


def main(argv=None):
    # No collection while loading: freed holes would be refilled after fork, and a
    # collection in a worker writes to every tracked object's header (research note §1).
    gc.disable()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.server == "wsgi":
        args.server = "builtin"  # the name of the built-in server before 0.2
    if args.interface == "callable" and args.server != "builtin":
        parser.error("--server does not apply to --interface callable (the app serves)")
    builtin_wsgi = args.interface == "wsgi" and args.server == "builtin"
    if args.threads is not None and not builtin_wsgi:
        parser.error("--threads applies to the built-in WSGI server only "
                     "(--interface wsgi, no --server)")
    if args.busy_reports and args.threads is None:
        parser.error("--busy-reports needs --threads N (an unbounded worker is never full)")

    link = inherited_link()
    if link is None and not _has_own_listeners():
        raise SystemExit(
            "hatchery_zygote: not started as a zygote (HATCHERY_ZYGOTE_FD is not set) "
            "nor as a worker (no LISTEN_FDS for this process)"
        )
    sys.path.insert(0, os.getcwd())
    app = _load(args.app, "the application")
    if not callable(app):
        raise SystemExit("hatchery_zygote: %s is not callable" % args.app)
    if args.interface == "wsgi" and looks_asgi(app):
        raise SystemExit(
            "hatchery_zygote: %s is a coroutine function, an ASGI app: pass --interface asgi"
            % args.app
        )
    hooks = importlib.import_module(args.hooks) if args.hooks else None
    after_load = _hook(hooks, "after_load")
    before_fork = _hook(hooks, "before_fork")
    after_fork = _hook(hooks, "after_fork")
    server = None if args.server == "builtin" else _load(args.server, "--server")
    if after_load is not None:
        after_load()
    gc.collect()
    gc.freeze()

    def worker(slot):
        def ready():
            notify(b"READY=1")
            print("hatchery_zygote: worker %d (pid %d) serving" % (slot, os.getpid()), flush=True)

        gc.enable()
        random.seed()
        if after_fork is not None:
            after_fork()
        sockets = listen_sockets()
        if args.interface == "callable":
            ready()
            result = app(sockets)
            return result if isinstance(result, int) else 0
        if not sockets:
            print("hatchery_zygote: no listener passed in LISTEN_FDS", file=sys.stderr)
            return 1
        if args.interface == "asgi" and server is None:
            return serve_asgi(app, sockets, ready)
        ready()
        if server is not None:
            server(app, sockets)
        else:
            serve_wsgi(app, sockets, threads=args.threads, busy_reports=args.busy_reports)
        return 0

    if link is None:
        # Exec mode: this process is the worker.
        slot = os.environ.get("HATCHERY_WORKER_ID", "")
        return worker(int(slot) if slot.isdigit() else 0)
    serve(link, worker, before_fork)
    return 0


if __name__ == "__main__":
    sys.exit(main())
