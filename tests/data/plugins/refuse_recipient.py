"""refuse_recipient: a test queue plugin that gives one recipient a result of its own.

A recipient whose local part starts with ``full`` is marked ``(DENYSOFT, "452 4.2.2
mailbox full")`` in ``transaction.notes["recipient_results"]`` (as a queue plugin with
per-recipient outcomes does), one starting with ``gone`` ``(DENY, "550 5.1.1 no such
mailbox")``; then it declines, so the next queue plugin delivers the others. The dict
is there only on an LMTP listener; on SMTP nothing is marked (the one 250 covers all).
"""

from qpgevent.plugin import DECLINED, DENY, DENYSOFT, Plugin

RESULTS = {"full": (DENYSOFT, "452 4.2.2 mailbox full"), "gone": (DENY, "550 5.1.1 no such mailbox")}


class RefuseRecipient(Plugin):
    def hook_queue(self, session):
        results = session.transaction.notes.get("recipient_results")
        if results is None:
            return DECLINED
        for recipient in session.transaction.recipients:
            for prefix, result in RESULTS.items():
                if recipient.user.startswith(prefix):
                    results[recipient.address] = result
        return DECLINED
