"""Hooks for the tests: records that they ran, and where."""

calls = []


def before_fork():
    calls.append("before")


def after_fork():
    calls.append("after")
