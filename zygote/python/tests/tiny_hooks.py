"""Hooks for the tests: records that they ran, and where.

``calls`` is what a worker inherits; with HOOKS_LOG set, each hook also appends a line
``<hook> <pid>`` to that file, so a test sees what ran in the zygote; while a file
named HOOKS_LOG + ".fail" exists, before_fork() raises."""

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
    path = os.environ.get("HOOKS_LOG")
    if path and os.path.exists(path + ".fail"):
        raise RuntimeError("told to fail")
    _record("before")


def after_fork():
    _record("after")
