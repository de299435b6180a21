"""Zygote mode for Hatchery: load a WSGI or ASGI application (or any entry point) once,
then fork workers on the agent's request (protocol version 1, documented in
src/zygote.rs of Hatchery)."""

from .protocol import PROTOCOL_VERSION, ProtocolError
from .zygote import serve, inherited_link

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "serve", "inherited_link"]
