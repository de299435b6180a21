"""The zygote protocol, version 3: messages and their text (see src/zygote.rs).

One message is one SOCK_SEQPACKET datagram of printable ASCII, at most 512 bytes, fields
separated by single spaces; fds travel as SCM_RIGHTS.

- zygote -> agent ``READY <version>`` once loaded: the lower of ours and the agent's
  (``HATCHERY_ZYGOTE_PROTOCOL``, 2 if unset; version 1 zygotes said ``READY 1``);
- agent -> zygote ``FORK <slot> <request-id>`` with 2 fds (the worker's stdout and its
  stderr), or 1 for both (what the agent sends a version 1 zygote);
- zygote -> agent ``FORKED <request-id> <pid>`` with 1 fd (the worker's go pipe), or
  ``FAILED <request-id> <reason...>``;
- zygote -> agent, version 3, at any time after ``READY``: ``SPARE <pid>``, a worker
  forked ahead of its ``FORK`` (the agent moves it into its cgroup leaf ahead).
"""

import os

from dataclasses import dataclass

PROTOCOL_VERSION = 3
# The first version with SPARE.
SPARE_VERSION = 3
PROTOCOL_ENV = "HATCHERY_ZYGOTE_PROTOCOL"
MAX_MESSAGE_BYTES = 512
GO = b"go\n"


class ProtocolError(ValueError):
    """A message that does not follow the protocol."""


@dataclass(frozen=True)
class Ready:
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Forked:
    request: int
    pid: int


@dataclass(frozen=True)
class Failed:
    request: int
    reason: str


@dataclass(frozen=True)
class Spare:
    pid: int


@dataclass(frozen=True)
class Fork:
    slot: int
    request: int


def _fields(data):
    if not data:
        raise ProtocolError("empty message")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("longer than 512 bytes")
    if any(b < 0x20 or b > 0x7E for b in data):
        raise ProtocolError("not printable ASCII: %r" % (data,))
    fields = data.decode("ascii").split(" ")
    if any(f == "" for f in fields):
        raise ProtocolError("fields must be separated by single spaces: %r" % (data,))
    return fields


def _number(field, what, limit):
    if not field.isdigit() or not field.isascii() or len(field) > 20:
        raise ProtocolError("bad %s %r" % (what, field))
    value = int(field)
    if value > limit:
        raise ProtocolError("bad %s %r" % (what, field))
    return value


U32 = 2**32 - 1
U64 = 2**64 - 1
I32 = 2**31 - 1


def format_message(message):
    """The bytes of a message."""
    if isinstance(message, Ready):
        return b"READY %d" % message.version
    if isinstance(message, Forked):
        return b"FORKED %d %d" % (message.request, message.pid)
    if isinstance(message, Spare):
        return b"SPARE %d" % message.pid
    if isinstance(message, Fork):
        return b"FORK %d %d" % (message.slot, message.request)
    if isinstance(message, Failed):
        clean = "".join(c if "!" <= c <= "~" else " " for c in message.reason)
        words = " ".join(clean.split()) or "unknown"
        text = ("FAILED %d %s" % (message.request, words))[:MAX_MESSAGE_BYTES].rstrip()
        return text.encode("ascii")
    raise TypeError("not a protocol message: %r" % (message,))


def parse_to_agent(data):
    """Parses a message the zygote sends (READY, FORKED, FAILED, SPARE)."""
    f = _fields(data)
    if f[0] == "READY" and len(f) == 2:
        return Ready(_number(f[1], "version", U32))
    if f[0] == "FORKED" and len(f) == 3:
        pid = _number(f[2], "pid", I32)
        if pid < 2:
            raise ProtocolError("bad pid %r" % (f[2],))
        return Forked(_number(f[1], "request id", U64), pid)
    if f[0] == "SPARE" and len(f) == 2:
        pid = _number(f[1], "pid", I32)
        if pid < 2:
            raise ProtocolError("bad pid %r" % (f[1],))
        return Spare(pid)
    if f[0] == "FAILED" and len(f) >= 3:
        return Failed(_number(f[1], "request id", U64), " ".join(f[2:]))
    raise ProtocolError("unknown message or wrong number of fields: %r" % (data,))


def parse_to_zygote(data):
    """Parses a message the agent sends (FORK)."""
    f = _fields(data)
    if f[0] == "FORK" and len(f) == 3:
        return Fork(_number(f[1], "slot", U32), _number(f[2], "request id", U64))
    raise ProtocolError("unknown message or wrong number of fields: %r" % (data,))


def version_to_say(environ=None):
    """The version to say in READY: the lower of ours and the agent's (2 when the agent
    does not say its own, as agents before version 3 did not)."""
    value = (os.environ if environ is None else environ).get(PROTOCOL_ENV, "")
    agent = int(value) if value.isdigit() and len(value) < 10 else 2
    return max(1, min(agent, PROTOCOL_VERSION))
