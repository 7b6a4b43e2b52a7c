"""Shared fixtures. The suite runs under ``python -m gevent.monkey --module pytest``,
so sockets are cooperative before anything imports them; we check that first."""

from __future__ import annotations

import gevent
import gevent.monkey
import pytest
from gevent import events

from qpgevent.testing import DEFAULT_PLUGINS, ServerProcess, write_ini

if not gevent.monkey.is_module_patched("socket"):
    raise pytest.UsageError("run the tests as: python -m gevent.monkey --module pytest")

# ldap3 (auth/ldap, rcpt_ldap) takes up to 1.4 s to import on a loaded machine. A server
# imports its plugins before it serves; tests load plugins with the monitor running, so
# the import is done here, once, before the monitor starts.
import ldap3  # noqa: E402, F401

# gevent's hub monitor: anything that keeps the event loop from switching for a whole
# second (a plugin calling blocking C code, a CPU-bound loop) fails the test it ran in.
# In-process servers share this hub, so this catches server code, not only test code.
BLOCKED_FOR = 1.0
gevent.config.monitor_thread = True
gevent.config.max_blocking_time = BLOCKED_FOR
gevent.get_hub().start_periodic_monitoring_thread()
_blocked: list[events.EventLoopBlocked] = []
events.subscribers.append(lambda event: isinstance(event, events.EventLoopBlocked) and _blocked.append(event))


@pytest.fixture(autouse=True)
def hub_never_blocks():
    # Switch to the hub before and after: the monitor counts time without a greenlet switch,
    # and a run of synchronous tests (pytest's own work included) switches never; without
    # these, a second of them in a row failed whichever test it ended in.
    gevent.sleep(0)
    seen = len(_blocked)
    yield
    gevent.sleep(0)
    if len(_blocked) > seen:
        report = "\n".join(_blocked[seen].info[:40])
        pytest.fail(f"the gevent hub was blocked for more than {BLOCKED_FOR}s:\n{report}")


@pytest.fixture
def make_server(qpgevent_server):
    """Start the real server in this process: ``make_server(plugins=..., **settings)``
    (the ``qpgevent_server`` fixture of qpgevent.testing.pytest_plugin, under this suite's name)."""
    return qpgevent_server


@pytest.fixture
def server(make_server):
    """The real server with rcpt_ok (example.test) and queue/maildir."""
    return make_server()


@pytest.fixture
def server_process(tmp_path):
    """Start ``python -m qpgevent`` as a child: ``server_process(plugins=..., **settings)``."""
    started = []

    def start(plugins: str = DEFAULT_PLUGINS, *args: str, **settings):
        ini = write_ini(tmp_path, plugins, **settings)
        process = ServerProcess(ini, *args)
        process.maildir = tmp_path / "Maildir"
        started.append(process)
        return process

    yield start
    for process in started:
        if process.process.poll() is None:
            process.kill()
