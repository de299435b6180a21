"""A tiny --interface callable entry point: serves one connection itself, then exits 7."""

import os


def main(sockets):
    conn, _ = sockets[0].accept()
    conn.sendall(
        b"callable: worker %s, pid %d, %d socket(s)\n"
        % (os.environ["HATCHERY_WORKER_ID"].encode(), os.getpid(), len(sockets))
    )
    conn.close()
    return 7
