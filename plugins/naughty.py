"""naughty: refuse later the clients that an earlier check marked as naughty.

A check configured with ``reject = naughty`` (fcrdns, helo, dnsbl, earlytalker...) does
not refuse on the spot: it records its refusal in its connection result (the evidence
``naughty``, the reply text, and ``naughty_reject_type``) and lets the client go on; the
first refusal recorded wins. This plugin turns the note into the refusal at ``reject_at``. By then the client
has said whom the mail is from and for, so the log line of the refusal shows the
envelope; and a client that authenticates meanwhile (a roaming user on a listed
address) has become a relay client and is let through. qpsmtpd's ``naughty``.

Put it after the checks that defer to it and before ``rcpt_ok``: the first plugin that
says OK to a recipient ends the rcpt hook, and naughty would never see it. It also
refuses at every later stage it reaches (with ``reject_at = mail``: at MAIL, RCPT and
DATA), so a deferred refusal is never lost. Relay clients and whitelisted hosts or
senders (``is_immune``) are not refused.

Options:
  reject_at    mail, rcpt (default) or data: where the refusal happens
  reject       1 (default): refuse; 0: only log what would have been refused (a dry run)
  reject_type  the type when the note has none of its own (default perm); the refusal
               otherwise uses the type of the check that stored it

Results read: the ``naughty`` and ``naughty_reject_type`` evidence of every plugin's
``connection.results``, the first recorded.

Example::

    [[helo]]
      policy = rfc
      reject = naughty
    [[fcrdns]]
      reject = naughty
    [[naughty]]
      reject_at = rcpt
    [[rcpt_ok]]
      domains = example.test
"""

from qpgevent.plugin import DECLINED, Plugin, reject_code

STAGES = ("mail", "rcpt", "data")


class Naughty(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = 'reject_at = option("mail", "rcpt", "data", default="rcpt")'

    def setup(self):
        if self.config["reject"] == "naughty":
            raise ValueError("reject = naughty: naughty is where deferred refusals end; use 1 or 0")

    def hook_mail(self, session, sender, params):
        return self._refuse(session, "mail", f"from={sender.format()}")

    def hook_rcpt(self, session, recipient, params):
        return self._refuse(session, "rcpt", f"from={session.transaction.sender} rcpt={recipient.format()}")

    def hook_data(self, session):
        transaction = session.transaction
        rcpts = ",".join(rcpt.format() for rcpt in transaction.recipients)
        return self._refuse(session, "data", f"from={transaction.sender} rcpts={rcpts}")

    def _refuse(self, session, stage, envelope):
        if STAGES.index(stage) < STAGES.index(self.config["reject_at"]):
            return DECLINED
        deferred = next((result for result in session.connection.results if result.get("naughty")), None)
        if deferred is None:
            return DECLINED
        message = deferred["naughty"]
        if self.is_immune(session):
            self.log.info("skip, immune (relay client or whitelisted): %s; %s", message, envelope)
            return DECLINED
        reject_type = deferred.get("naughty_reject_type") or self.config["reject_type"]
        if self.config["reject"] == "0":
            self.log.info("fail, tolerated: %s; %s", message, envelope)
            return DECLINED
        self.log.info("refusing at %s (%s): %s; %s", stage, reject_type, message, envelope)
        return reject_code(reject_type), message
