"""recorder: a test plugin that writes down the notification hooks it sees.

Used by ``tests/e2e/test_hooks.py``. Each call appends ``(hook, connection id, detail)``
to the module-level ``EVENTS``; for ``deny`` and ``ok`` the detail is
``(plugin, code name, message, internal_error)``. The server runs in the test's own
process, so a test reads ``EVENTS`` directly, and ``wait_for`` lets it wait
(cooperatively, with a deadline) for hooks that fire after the client has gone.
"""

import gevent
import gevent.event

from qpgevent.plugin import Plugin

EVENTS = []
_changed = gevent.event.Event()


def wait_for(predicate, timeout=5.0):
    """Block until ``predicate(EVENTS)`` is true; raise gevent.Timeout after ``timeout``."""
    with gevent.Timeout(timeout):
        while not predicate(EVENTS):
            _changed.clear()
            _changed.wait()


def _record(hook, session, detail=None):
    EVENTS.append((hook, session.connection.id, detail))
    _changed.set()


class Recorder(Plugin):
    def hook_reset_transaction(self, session):
        _record("reset_transaction", session)

    def hook_queue_post(self, session):
        _record("queue_post", session)

    def hook_disconnect(self, session):
        _record("disconnect", session)

    def hook_post_connection(self, session):
        _record("post_connection", session)

    def hook_deny(self, session, verdict):
        _record("deny", session, (verdict.plugin, verdict.code.name, verdict.message, verdict.internal_error))

    def hook_ok(self, session, verdict):
        _record("ok", session, (verdict.plugin, verdict.code.name, verdict.message, verdict.internal_error))
