"""queue/discard: accept every message and throw it away. FOR BENCHMARKS ONLY.

Answers ``250 2.0.0 Queued (discarded)`` and keeps nothing, so a benchmark measures the
SMTP engine and not the disk. Never use it on a server that receives real mail: the
client is told the message is safe, and it is gone.

Options: only the standard ones (it never refuses).

Example::

    [[queue/discard]]
"""

from qpgevent.plugin import OK, Plugin


class Discard(Plugin):
    def setup(self):
        self.log.warning("queue/discard is loaded: every accepted message is thrown away")

    def hook_queue(self, session):
        return OK, "Queued (discarded)"
