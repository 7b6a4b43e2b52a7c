"""A context variable set for the length of a ``with`` block, then put back as it was.

The services a session uses (its server's resolver, its store) live in context
variables, one per service module: gevent gives each greenlet its own context, so a
value set there belongs to one session. ``Scoped`` is the ``with`` form, for a block
(a test, a tool, the plugin harness); the server sets them for a whole session instead.
"""

from __future__ import annotations

import contextvars
from typing import Generic, TypeVar

__all__ = ["Scoped"]

T = TypeVar("T")


class Scoped(Generic[T]):
    """``with Scoped(variable, value):`` ``variable`` is ``value`` inside; ``as`` gives the value."""

    __slots__ = ("variable", "value", "token")

    def __init__(self, variable: contextvars.ContextVar[T | None], value: T) -> None:
        self.variable = variable
        self.value = value
        self.token: contextvars.Token[T | None] | None = None

    def __enter__(self) -> T:
        self.token = self.variable.set(self.value)
        return self.value

    def __exit__(self, *exc_info: object) -> None:
        assert self.token is not None
        self.variable.reset(self.token)
        self.token = None
