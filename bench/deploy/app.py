"""WSGI app of the deploy benchmark: a ~50 ms handler answering with its release.

The release id is the RELEASE file beside this file (after resolving symlinks), read at
import. APP_STARTUP_DELAY (seconds, default 0) delays the import, i.e. the app takes that
long to become ready; APP_HANDLER_DELAY (seconds, default 0.05) is the handler's sleep.
Nothing here knows about any supervisor: under Hatchery, gunicorn itself takes its socket
from LISTEN_FDS and sends READY=1 to NOTIFY_SOCKET.
"""
import os
import time

HERE = os.path.dirname(os.path.realpath(__file__))
try:
    with open(os.path.join(HERE, "RELEASE")) as f:
        RELEASE = f.read().strip()
except OSError:
    RELEASE = os.path.basename(HERE)
GENERATION = os.environ.get("HATCHERY_GENERATION", "-")
DELAY = float(os.environ.get("APP_HANDLER_DELAY", "0.05"))
time.sleep(float(os.environ.get("APP_STARTUP_DELAY", "0")))


def app(environ, start_response):
    time.sleep(DELAY)
    body = ("release %s generation %s pid %d\n" % (RELEASE, GENERATION, os.getpid())).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
