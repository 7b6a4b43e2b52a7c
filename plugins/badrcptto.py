"""badrcptto: refuse listed recipients.

At RCPT, the recipient is matched against the entries of ``list`` and of ``file``
(qpsmtpd's ``config/badrcptto``; re-read when it changes). Entries are written as for
``badmailfrom``: ``user@example.com``, ``@example.com`` (or ``example.com``),
``/regex/`` or ``^regex``, each with an optional reason. The client is told the
reason, or ``mail to <recipient> not accepted here``. First match wins. Relay clients
and whitelisted hosts or senders are not checked.

Options (and the standard ``reject`` / ``reject_type``):
  list  entries written here, as a list
  file  a file of entries, one a line

Example::

    [[badrcptto]]
      list = "abuse-me@example.test", "/^noreply@/ this address takes no mail"
"""

from qpgevent.plugin import DECLINED, Plugin
from qpgevent.policy import Entries, match_address, parse_patterns


class Badrcptto(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    list = force_list(default=list())
    file = path(default="")
    """

    def setup(self):
        self.entries = Entries(self.config["list"], self.config["file"], parse_patterns)

    def hook_rcpt(self, session, recipient, params):
        if self.is_immune(session):
            return DECLINED
        pattern = match_address(self.entries.get(), recipient.address)
        if pattern is None:
            return DECLINED
        self.log.info("recipient %s matches %r", recipient.format(), pattern.text)
        return self.reject(pattern.reason or f"mail to {recipient.address} not accepted here", session)
