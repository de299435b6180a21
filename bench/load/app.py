"""The load benchmark's app: every request takes 50 ms (time.sleep, as a request that
waits on a database would) and answers a small body naming the process."""

import os
import time

HANDLER_SECONDS = 0.05


def app(environ, start_response):
    time.sleep(HANDLER_SECONDS)
    body = b"ok %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
