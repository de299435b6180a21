"""Hooks for the tests: records that they ran, and where.

``calls`` is what a worker inherits; with HOOKS_LOG set, each hook also appends a line
``<hook> <pid>`` to that file, so a test sees what ran in the zygote."""

import os

calls = []


def _record(name):
    calls.append(name)
    path = os.environ.get("HOOKS_LOG")
    if path:
        with open(path, "a") as f:
            f.write("%s %d\n" % (name, os.getpid()))


def after_load():
    _record("load")


def before_fork():
    _record("before")


def after_fork():
    _record("after")
