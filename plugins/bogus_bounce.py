"""bogus_bounce: refuse bounces that cannot be real ones.

A bounce (a delivery status notification) has the null sender ``<>`` and goes to
exactly one recipient, the original sender (RFC 5321 4.5.5, RFC 3464). After the
message is received (data_post), a message from ``<>`` is refused when it has more
than one recipient (``Invalid bounce: more than one recipient``), or a non-empty
Return-Path header (``Invalid bounce: non-empty Return-Path``): spam sent as fake
bounces. Relay clients and whitelisted hosts or senders are not checked.

Options: the standard ``reject`` / ``reject_type`` (``reject = 0`` only logs), or
qpsmtpd's ``action``, which takes precedence when given: ``log`` (only log),
``deny`` (5xx) or ``denysoft`` (4xx).

Example::

    [[bogus_bounce]]
      reject_type = temp
"""

from qpgevent.plugin import DECLINED, DENY, DENYSOFT, Plugin


class BogusBounce(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = 'action = option("log", "deny", "denysoft", default=None)'

    def hook_data_post(self, session):
        transaction = session.transaction
        if transaction.sender is None or not transaction.sender.is_null or self.is_immune(session):
            return DECLINED
        problem = None
        if len(transaction.recipients) > 1:
            problem = "Invalid bounce: more than one recipient"
        else:
            return_path = (transaction.headers.get("Return-Path") or "").strip()
            if return_path not in ("", "<>"):
                problem = "Invalid bounce: non-empty Return-Path"
        if problem is None:
            return DECLINED
        action = self.config["action"]
        if action == "log":
            self.log.info("fail, tolerated: %s", problem)
            return DECLINED
        if action is not None:
            return (DENY if action == "deny" else DENYSOFT), problem
        return self.reject(problem, session)
