"""context_probe: a test plugin that writes down, at MAIL, what the session's context holds.

Used by ``tests/e2e/test_parking.py``: a session that parked and woke in a new greenlet
must still have its log ids bound and its DNS budget in force. Each MAIL appends
``(connection id, the conn id a log line would get, the DNS budget left)`` to ``CALLS``.
"""

import logging

from qpgevent import dns
from qpgevent.backends.log import SessionContext
from qpgevent.plugin import Plugin

CALLS = []


class ContextProbe(Plugin):
    def hook_mail(self, session, sender, params):
        record = logging.LogRecord("probe", logging.INFO, __file__, 0, "probe", (), None)
        SessionContext().filter(record)  # what any plugin's log line would be given
        CALLS.append((session.connection.id, getattr(record, "conn", None), dns.remaining_budget()))
