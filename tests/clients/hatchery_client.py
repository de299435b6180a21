#!/usr/bin/env python3
"""A tiny Hatchery control client (standard library only): the protocol of the README's
"Control protocol" section. One JSON request per connection, then JSON lines back: progress
({"event": ...} or {"line": ...}), and a final {"ok": ...} or {"error": {...}}.

    hatchery_client.py SOCKET status [SITE]     prints each site: name state ready/desired
    hatchery_client.py SOCKET scale SITE N      prints progress, then the agent's message
"""
import json
import socket
import sys

PROTOCOL_VERSION = 1


class HatcheryError(Exception):
    """The agent refused or failed the request."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def request(path, req, on_progress=None):
    """Sends req (a dict with "cmd"); returns the final "ok" value, or raises."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        for raw in s.makefile("rb"):
            reply = json.loads(raw)
            if "ok" in reply:
                return reply["ok"]
            if "error" in reply:
                raise HatcheryError(reply["error"]["kind"], reply["error"]["message"])
            if on_progress is not None:
                on_progress(reply.get("event", reply.get("line")))
    raise ConnectionError("the agent closed the connection without an answer")


def main(argv):
    path, cmd, args = argv[1], argv[2], argv[3:]
    try:
        if cmd == "status":
            status = request(path, {"cmd": "status", "site": args[0] if args else None})
            agent = status["agent"]
            print(f"agent {agent['version']} protocol {agent.get('protocol', 1)}")
            for site in status["sites"]:
                print(f"{site['name']} {site['state']} {site['ready']}/{site['desired']}")
        elif cmd == "scale":
            req = {"cmd": "scale", "site": args[0], "workers": int(args[1])}
            done = request(path, req, lambda e: print("  " + e, file=sys.stderr))
            print(f"{done['site']}: {done['message']}")
        else:
            sys.exit(f"unknown command {cmd}: use status or scale")
    except HatcheryError as e:
        sys.exit(f"hatchery ({e.kind}): {e}")


if __name__ == "__main__":
    main(sys.argv)
