"""The time limit of one plugin call: a ``gevent.Timeout`` kept and re-armed, not made per call.

The hook runner (``qpgevent.engine.hooks``) asks for a timer before every plugin call,
starts it, and closes it when the call returns. A new ``gevent.Timeout`` each time makes
and closes a libev watcher per call (docs/benchmarks.md, "Round three"); ``take`` hands
out a stopped one kept from an earlier call instead, and ``close`` puts it back.

What makes the reuse safe:

- The timer *is* the exception it raises (as a ``gevent.Timeout``), and the runner knows
  its call's timeout by identity. A timer is out of the spares from ``take`` to ``close``,
  so two calls in progress (one inside the other, or in two greenlets) never share one,
  and an outer call's timeout raised inside an inner call is still the outer's.
- It raises only while its caller waits (the loop runs the expiry, which throws into the
  caller at once), and ``close`` stops it; so nothing of one call is left to fire in the
  next. A raised timer loses its traceback when it is put back.
- Every call gets its whole period: libev's stop keeps the time a timer had left, and a
  plain restart would resume it (a timer that fired would fire again at once). These are
  repeating timers re-armed with ``again``, which starts from the full period (as the
  session's read timers, ``qpgevent.server.driver._Timer``), stopped when they fire.
"""

from __future__ import annotations

from typing import Any

import gevent
from gevent import getcurrent

#: Stopped timers kept for the next calls, per duration (at most SPARES each).
_SPARES: dict[float, list[PluginTimeout]] = {}
SPARES = 64


class PluginTimeout(gevent.Timeout):
    """A plugin call's timeout; get one with ``take``, and ``close`` it when the call is over."""

    def __init__(self, seconds: float) -> None:
        # What gevent.Timeout.__init__ sets, but for the watcher: ours repeats, to be re-armed whole.
        BaseException.__init__(self)
        self.seconds, self.exception, self._one_shot = seconds, None, False
        self.loop = gevent.get_hub().loop
        self.timer = self.loop.timer(seconds, seconds, priority=-1)

    def start(self) -> None:
        self.timer.again(self._expired, getcurrent(), update=True)

    def _expired(self, caller: Any) -> None:
        self.timer.stop()  # it repeats: once is all we want
        caller.throw(self)

    def close(self) -> None:
        """The call is over: stopped, and kept for the next call of this duration."""
        self.timer.stop()
        if self.__traceback__ is not None:  # type: ignore[has-type]  # it was raised: forget where
            self.__traceback__ = self.__context__ = None
        spare = _SPARES.setdefault(self.seconds, [])
        if len(spare) < SPARES:
            spare.append(self)
        else:
            super().close()


def take(seconds: float) -> PluginTimeout:
    """A stopped timer of ``seconds`` on this thread's loop: a spare, or a new one.

    The hook runner's ``timeout`` (``HookRunner(..., timeout=plugin_timer.take)``).
    """
    spare = _SPARES.get(seconds)
    if spare:
        loop = gevent.get_hub().loop
        while spare:
            timer = spare.pop()
            if timer.loop is loop:  # else another thread's loop's: not ours to touch, dropped
                return timer
    return PluginTimeout(seconds)
