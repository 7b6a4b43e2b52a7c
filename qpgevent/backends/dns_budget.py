"""The DNS time budget of a session, and look-ups run at once (``parallel``).

``budget(seconds)`` bounds the DNS time of everything run inside it, in this greenlet
(and the ones ``parallel`` starts): the time spent waiting on look-ups is summed (look-ups
running at once count once, as the wall-clock time during which any was pending; time
between look-ups does not count, so a long SMTP session is not starved), each look-up
gets at most what is left, and past the budget a look-up that needs the network raises
TemporaryFailure (cached answers still come back). ``parallel`` runs several look-ups at
once: a plugin checking five blocklists waits for the slowest, not for the sum.
``ahead`` starts a look-up now whose answer a later hook takes: look-ups of different
plugins, or of different SMTP commands, overlap instead of queueing one after another.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gevent

Call = Callable[[], Any] | tuple[Any, ...]


class _Budget:
    """Seconds of DNS waiting one ``budget`` block allows, and how many it has used."""

    __slots__ = ("seconds", "outer", "spent", "pending", "since")

    def __init__(self, seconds: float, outer: _Budget | None) -> None:
        self.seconds = seconds
        self.outer = outer  #: the enclosing budget: a look-up spends from both
        self.spent = 0.0  #: seconds used by look-ups that have ended
        self.pending = 0  #: look-ups running now (parallel ones share the clock)
        self.since = 0.0  #: when the first of the pending look-ups started

    def remaining(self) -> float:
        spent = self.spent + (time.monotonic() - self.since if self.pending else 0.0)
        left = max(0.0, self.seconds - spent)
        return left if self.outer is None else min(left, self.outer.remaining())

    def chain(self) -> Iterator[_Budget]:
        budget: _Budget | None = self
        while budget is not None:
            yield budget
            budget = budget.outer

    @contextlib.contextmanager
    def spending(self) -> Iterator[None]:
        """Charge the time inside to this budget and every enclosing one."""
        now = time.monotonic()
        for budget in self.chain():
            if not budget.pending:
                budget.since = now
            budget.pending += 1
        try:
            yield
        finally:
            now = time.monotonic()
            for budget in self.chain():
                budget.pending -= 1
                if not budget.pending:
                    budget.spent += now - budget.since


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("qpgevent_dns_budget",
                                                                         default=None)


class _BudgetBlock:
    """The ``with`` block of one ``budget`` call (a class: a generator is dear per session)."""

    __slots__ = ("seconds", "token")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.token: contextvars.Token[_Budget | None] | None = None

    def __enter__(self) -> None:
        self.token = _budget.set(_Budget(self.seconds, _budget.get()))

    def __exit__(self, *exc_info: object) -> None:
        assert self.token is not None
        _budget.reset(self.token)


def budget(seconds: float) -> _BudgetBlock:
    """Allow the look-ups inside ``seconds`` of DNS waiting in all (nested budgets: the tighter wins)."""
    return _BudgetBlock(seconds)


def remaining_budget() -> float | None:
    """Seconds of DNS waiting left in the current budget, or None outside any budget."""
    current = _budget.get()
    return None if current is None else current.remaining()


def parallel(calls: Sequence[Call], return_exceptions: bool = False) -> list[Any]:
    """Run ``calls`` at once, one greenlet each (one call alone runs in the caller's);
    return their results in the order given.

    A call is a callable or a tuple ``(callable, arg, ...)``. Each runs under the caller's
    DNS budget. When calls raise, the first exception (in call order) is raised once all
    have ended; with ``return_exceptions`` it takes that call's place in the list instead.
    If the caller is interrupted (its hook timed out), the calls still running are killed.
    """
    calls = list(calls)
    if len(calls) < 2:
        # Nothing to wait for at once: run it here (as most callers ask for one call, or
        # none), in a copy of our context as its own greenlet would have.
        outcomes = [contextvars.copy_context().run(_capture, *_split(call)) for call in calls]
    else:
        # A new greenlet starts with an empty context: give each its own copy of ours.
        jobs = [gevent.spawn(contextvars.copy_context().run, _capture, *_split(call)) for call in calls]
        try:
            gevent.joinall(jobs)
        finally:
            gevent.killall([job for job in jobs if not job.dead], block=False)
        outcomes = [job.value for job in jobs]
    results = []
    for ok, value in outcomes:
        if not ok and not return_exceptions:
            raise value
        results.append(value)
    return results


class Ahead:
    """A look-up started by ``ahead``: ``result()`` waits for it and gives its value or raises."""

    __slots__ = ("_job",)

    def __init__(self, call: Call) -> None:
        # Its own copy of our context: the session's resolver and DNS budget.
        self._job = gevent.spawn(contextvars.copy_context().run, _capture, *_split(call))

    def result(self) -> Any:
        self._job.join()
        ok, value = self._job.value if self._job.successful() else (False, self._job.exception)
        if not ok:
            raise value
        return value

    def cancel(self) -> None:
        """Not needed after all: stop it if it still runs."""
        self._job.kill(block=False)


def ahead(call: Call) -> Ahead:
    """Start ``call`` (a callable or ``(callable, arg, ...)``) in a greenlet of its own now,
    under the caller's resolver and DNS budget; a later hook takes its ``result()``.

    For look-ups whose answer is needed later (the DNSBL answers at connect, asked while
    the core confirms the client's name): the wait overlaps with whatever runs meanwhile.
    A look-up nobody takes ends by itself, within the DNS timeout.
    """
    return Ahead(call)


def _split(call: Call) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return (call[0], call[1:]) if isinstance(call, tuple) else (call, ())


def _capture(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    # Caught here rather than left to the greenlet, which would print a traceback per failure.
    try:
        return True, function(*args)
    except Exception as error:
        return False, error


__all__ = ["Ahead", "ahead", "budget", "parallel", "remaining_budget"]
