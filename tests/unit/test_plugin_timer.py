"""The plugin call timer the server gives its hook runners (qpgevent/server/timers.py).

Timers are kept between calls and re-armed: these tests check that a kept timer still
gives each call its whole period (a timer that fired, restarted as libev would, fires again
at once), that a call's timeout is told from another call's by identity, and that two
calls in progress never share one. Real gevent timers and sleeps (a plugin that waits on
DNS yields the same way); deadlines generous, nothing asserted about how fast.
"""

from __future__ import annotations

import gevent
import pytest

from qpgevent.core.codes import OK, ReturnCode
from qpgevent.engine.hooks import HookRunner
from qpgevent.plugin import Plugin
from qpgevent.server import timers
from qpgevent.server.timers import PluginTimeout, take_plugin_timeout

PERIOD = 0.5


class _Waits(Plugin):
    """Each MAIL waits the next number of seconds of ``waits`` (a plugin waiting on DNS), then says OK."""

    def __init__(self, waits: list[float], timeout: float | None = None) -> None:
        super().__init__("waits", {"timeout": timeout})
        self.waits = waits

    def hook_mail(self, session, sender, params):
        gevent.sleep(self.waits.pop(0))
        return OK


class _Nested(Plugin):
    """Runs another runner's MAIL inside its own (a call in progress while another starts)."""

    def __init__(self, inner: HookRunner, wait: float) -> None:
        super().__init__("nested", {"timeout": None})
        self.inner, self.wait = inner, wait

    def hook_mail(self, session, sender, params):
        inner = self.inner.run("mail", None, "a@b.test", {})
        gevent.sleep(self.wait)  # the inner call closed its timer; ours must still run
        return inner.code, "inner " + inner.code.name


def _runner(*plugins: Plugin, seconds: float = PERIOD) -> HookRunner:
    return HookRunner(list(plugins), default_timeout=seconds, timeout=take_plugin_timeout)


def test_a_call_that_waits_past_its_time_answers_plugin_timeout() -> None:
    verdict = _runner(_Waits([30])).run("mail", None, "a@b.test", {})
    assert verdict.code is ReturnCode.DENYSOFT and verdict.internal_error
    assert verdict.message == ("plugin timeout",)


def test_the_call_after_a_timed_out_one_has_its_whole_period() -> None:
    # The second call waits 0.6 of the period on the very timer that fired for the first.
    runner = _runner(_Waits([30, PERIOD * 0.6, PERIOD * 0.6, 30]))
    assert runner.run("mail", None, "a@b.test", {}).message == ("plugin timeout",)
    spare = timers._SPARES[PluginTimeout, PERIOD][-1]
    assert spare.__traceback__ is None  # what it raised through is forgotten
    assert runner.run("mail", None, "a@b.test", {}).code is OK
    assert timers._SPARES[PluginTimeout, PERIOD][-1] is spare  # kept and re-armed, not made anew
    assert runner.run("mail", None, "a@b.test", {}).code is OK  # twice 0.6: each call its own period
    assert runner.run("mail", None, "a@b.test", {}).message == ("plugin timeout",)  # and it still fires


def test_calls_in_other_greenlets_keep_their_own_timers() -> None:
    # Three sessions at once, the middle one too slow: only it times out.
    runners = [_runner(_Waits([wait])) for wait in (PERIOD * 0.5, 30, PERIOD * 0.7)]
    calls = [gevent.spawn(runner.run, "mail", None, "a@b.test", {}) for runner in runners]
    gevent.joinall(calls, timeout=30, raise_error=True)
    assert [call.value.code for call in calls] == [OK, ReturnCode.DENYSOFT, OK]
    assert calls[1].value.internal_error


@pytest.mark.parametrize("outer_wait,expected", [(PERIOD * 0.6, "inner DENYSOFT"), (30, "plugin timeout")])
def test_a_call_inside_a_call_has_a_timer_of_its_own(outer_wait: float, expected: str) -> None:
    # The inner plugin times out (its 0.2 s); the outer one goes on under its own timer, and
    # still times out at its own period when it waits past it.
    inner = _runner(_Waits([30], timeout=0.2))
    verdict = _runner(_Nested(inner, outer_wait), seconds=PERIOD * 2).run("mail", None, "a@b.test", {})
    assert verdict.message == (expected,)
    assert verdict.plugin == "nested"
