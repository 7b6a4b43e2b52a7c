"""badmailfromto: refuse listed sender / recipient pairs.

Each entry is ``SENDER RECIPIENT``, both written as in ``badmailfrom`` (an address,
``@domain`` or ``domain``, ``/regex/`` or ``^regex`` without spaces, ``<>``). At RCPT,
a recipient is refused when some entry matches both the transaction's sender and
that recipient: ``mail to <recipient> not accepted here``. Other recipients of the
same sender pass. Relay clients and whitelisted hosts or senders are not checked.

Options (and the standard ``reject`` / ``reject_type``):
  list  pairs written here, as a list: "boss@partner.example @example.test"
  file  a file of pairs, one a line (qpsmtpd's ``config/badmailfromto``), re-read when it changes

Example::

    [[badmailfromto]]
      list = "boss@partner.example @example.test", "<> noreply@example.test"
      file = badmailfromto
"""

from qpgevent.plugin import DECLINED, Plugin
from qpgevent.policy import Entries, parse_patterns


def parse_pairs(entries):
    pairs = []
    for entry in entries:
        words = entry.split()
        if len(words) != 2:
            raise ValueError(f"{entry!r}: write SENDER RECIPIENT")
        sender, recipient = parse_patterns([words[0]])[0], parse_patterns([words[1]])[0]
        pairs.append((sender, recipient))
    return pairs


class Badmailfromto(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    list = force_list(default=list())
    file = path(default="")
    """

    def setup(self):
        self.pairs = Entries(self.config["list"], self.config["file"], parse_pairs)

    def hook_rcpt(self, session, recipient, params):
        if self.is_immune(session):
            return DECLINED
        sender = session.transaction.sender
        sender_address = sender.address if sender is not None else ""
        for sender_pattern, recipient_pattern in self.pairs.get():
            if sender_pattern.matches(sender_address) and recipient_pattern.matches(recipient.address):
                self.log.info("pair %s -> %s is listed", sender_address or "<>", recipient.address)
                return self.reject(f"mail to {recipient.address} not accepted here", session)
        return DECLINED
