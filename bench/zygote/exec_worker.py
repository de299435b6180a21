"""Exec mode's worker: a fresh Python that imports the app, says READY=1 on NOTIFY_SOCKET
and serves the listener inherited at fd 3 (LISTEN_FDS) with the same server the zygote's
workers run (hatchery_zygote.server, wsgiref with a thread per connection, or at most N
requests at once with ``--threads N``), so the two Hatchery variants differ only in how the
worker came to be.

    python3 exec_worker.py module:app [--threads N]
"""

import importlib
import sys

from hatchery_zygote.server import listen_sockets, notify, serve_wsgi


def main():
    threads = None
    if sys.argv[2:3] == ["--threads"]:
        threads = int(sys.argv[3])
    module, _, name = sys.argv[1].partition(":")
    app = getattr(importlib.import_module(module), name or "app")
    sockets = listen_sockets()
    if not sockets:
        sys.exit("exec_worker: no listener at fd 3 (LISTEN_FDS/LISTEN_PID)")
    notify(b"READY=1")
    serve_wsgi(app, sockets, threads=threads)


if __name__ == "__main__":
    sys.path.insert(0, ".")  # the release directory (the site's workdir)
    main()
