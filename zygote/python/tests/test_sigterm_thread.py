"""SIGTERM stops a worker whichever of its threads the kernel delivers it to."""

import os
import socket
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# A worker whose app, in the request's thread, sends SIGTERM to that thread: the main
# thread sleeps in its selector, with nothing else to wake it.
WORKER = r"""
import signal, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from hatchery_zygote.server import serve_wsgi

def app(environ, start_response):
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"signalled\n"]

threads = None if sys.argv[3] == "None" else int(sys.argv[3])
serve_wsgi(app, [socket.socket(fileno=int(sys.argv[2]))], threads=threads)
print("returned", threads, flush=True)
"""


class SigtermInAThreadTest(unittest.TestCase):
    def test_a_sigterm_taken_by_a_request_thread_stops_the_worker(self):
        # The unbounded server (a thread per connection) and the bounded one.
        for threads in ("None", "2"):
            with self.subTest(threads=threads):
                self.stops_on_a_sigterm_in_its_request_thread(threads)

    def stops_on_a_sigterm_in_its_request_thread(self, threads):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, ROOT, str(listener.fileno()), threads],
            pass_fds=[listener.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                answer = b""
                while chunk := c.recv(4096):
                    answer += chunk
            self.assertIn(b"signalled", answer)
            # Stopped without another connection to wake it (a stop told by a Python
            # handler waited for the main thread to run Python code: for ever here).
            self.assertEqual(worker.wait(timeout=10), 0)
            self.assertEqual(worker.stdout.read().split(), [b"returned", threads.encode()])
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            worker.stdout.close()
            listener.close()

if __name__ == "__main__":
    unittest.main()
