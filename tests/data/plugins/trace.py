"""trace: a test plugin for the received_line and rset hooks, and for rewriting paths.

- received_line: writes its own Received value (``from hidden by <me>``), keeping ours
  in the ``our_received`` transaction note;
- rset: counts RSET commands in the ``rsets`` connection note;
- mail_pre: a sender written ``<old@legacy.test>`` is rewritten to ``<new@example.test>``
  with ``session.rewrite_sender``; ``<implicit@legacy.test>`` by the old (OK, path) form;
  ``<wrong@legacy.test>`` calls ``rewrite_recipient`` at mail_pre, which is a bug (451).
"""

from qpgevent.plugin import DECLINED, OK, Plugin


class Trace(Plugin):
    def hook_received_line(self, session, line):
        session.transaction.notes["our_received"] = line
        return OK, f"from hidden by {session.me}; Thu, 1 Jan 2026 00:00:00 +0000"

    def hook_rset(self, session):
        session.notes["rsets"] = session.notes.get("rsets", 0) + 1

    def hook_mail_pre(self, session, path, params):
        if path == "<old@legacy.test>":
            session.rewrite_sender("<new@example.test>")
        elif path == "<implicit@legacy.test>":
            return OK, "<implicit@example.test>"
        elif path == "<wrong@legacy.test>":
            session.rewrite_recipient("<new@example.test>")
        return DECLINED
