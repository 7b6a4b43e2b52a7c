"""Loop timers kept and re-armed: a session's waits (``WaitTimer``) and its plugin calls (``PluginTimeout``).

Making a libev watcher and closing it costs more than the wait it guards (docs/benchmarks.md,
"Profile" and "Round three"), so a stopped timer is kept, per kind and duration, and handed
out again (``take``). Every one is a *repeating* timer re-armed with ``again``, and stopped
when it fires: libev's stop keeps the time a timer had left and a plain restart resumes it,
so a timer reused across waits counted their total (a steady upload cut at
``data_timeout``), and one that fired would fire again at once; ``again`` starts from the
whole period each time (RFC 5321 4.5.3.2: each wait gets it).

``PluginTimeout`` is what the hook runner (``qpgevent.engine.hooks``) starts around each
plugin call: a ``gevent.Timeout`` that raises itself, so the runner knows its call's timeout
by identity. That stays true with reuse: a timer is out of the spares from ``take`` to
``close``, so two calls in progress (one inside the other, or in two greenlets) never share
one; it raises only while its caller waits (the loop runs the expiry, which throws into the
caller at once), and ``close`` stops it, so nothing of one call fires in the next.
"""

from __future__ import annotations

from typing import Any, TypeVar

import gevent
from gevent import getcurrent

#: Stopped timers kept for later, per kind and duration (at most SPARES each).
_SPARES: dict[tuple[type, float], list[Any]] = {}
SPARES = 256

_Kind = TypeVar("_Kind", "WaitTimer", "PluginTimeout")


def _take(kind: type[_Kind], seconds: float) -> _Kind:
    """A spare timer of ``kind`` and ``seconds`` on this thread's loop, or a new one."""
    spare = _SPARES.get((kind, seconds))
    if spare:
        loop = gevent.get_hub().loop
        while spare:
            timer = spare.pop()
            if timer.loop is loop:
                return timer
            timer.timer.close()  # another thread's loop's: not reused
    return kind(seconds)


def _keep(timer: WaitTimer | PluginTimeout) -> bool:
    """Keep the stopped ``timer`` for later; False when there are enough of its kind."""
    spare = _SPARES.setdefault((type(timer), timer.seconds), [])
    if len(spare) < SPARES:
        spare.append(timer)
        return True
    return False


class WaitTimer:
    """The timeout of a session's waits for its client: raises TimeoutError in the waiter."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loop = gevent.get_hub().loop
        self.timer = self.loop.timer(seconds, seconds, priority=-1)

    @classmethod
    def take(cls, seconds: float) -> WaitTimer:
        """A spare one of this duration, or a new one: a session needs two or three."""
        return _take(cls, seconds)

    def release(self) -> None:
        """The session is done with it (ended, or parked): stopped, kept for another."""
        self.timer.stop()
        if not _keep(self):
            self.close()

    def start(self) -> None:
        self.timer.again(self._expired, getcurrent(), update=True)

    def cancel(self) -> None:
        self.timer.stop()

    def close(self) -> None:
        self.timer.close()

    def _expired(self, waiter: Any) -> None:
        self.timer.stop()  # it repeats: once is all we want
        waiter.throw(TimeoutError)


class PluginTimeout(gevent.Timeout):
    """A plugin call's timeout; ``take_plugin_timeout`` one, and ``close`` it when the call is over."""

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
        """The call is over: stopped, and kept for a later call of this duration."""
        self.timer.stop()
        if self.__traceback__ is not None:  # type: ignore[has-type]  # it was raised: forget where
            self.__traceback__ = self.__context__ = None
        if not _keep(self):
            super().close()


def take_plugin_timeout(seconds: float) -> PluginTimeout:
    """A stopped plugin call timeout of ``seconds``: the hook runner's ``timeout``
    (``HookRunner(..., timeout=take_plugin_timeout)``)."""
    return _take(PluginTimeout, seconds)
