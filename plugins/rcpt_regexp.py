"""rcpt_regexp: decide recipients by regular expressions (or exact addresses).

Each entry is ``PATTERN CODE [message]``: PATTERN a ``/regex/`` searched in the
recipient address (any case) or an exact address, CODE one of OK, DENY, DENYSOFT,
DENY_DISCONNECT, DENYSOFT_DISCONNECT or DECLINED. The first entry that matches
decides: OK accepts the recipient, DECLINED leaves it to later plugins, a refusal
gets the message (or ``No such user.``). No match: DECLINED. Python regular
expressions are compiled, never evaluated as code (qpsmtpd ``eval``'d its file).

Options (``reject = 0`` only logs what would have been refused):
  list  entries written here, as a list
  file  a file of entries, one a line (qpsmtpd's ``config/rcpt_regexp``), re-read when it changes

Example (the file)::

    /^(abuse|postmaster)@/   DECLINED
    /^(me|you)@example\\.org$/  OK
    /@example\\.org$/          DENY No such user.

Example::

    [[rcpt_regexp]]
      file = rcpt_regexp
      list = "/^spamtrap@/ DENY No such user."
"""

import re

from qpgevent.plugin import DECLINED, OK, Plugin, ReturnCode
from qpgevent.policy import Entries

CODES = {code.name: code for code in ReturnCode if code is not ReturnCode.DONE}


def parse_rules(entries):
    rules = []
    for entry in entries:
        if entry.startswith("/"):
            end = entry.rfind("/")
            if end == 0:
                raise ValueError(f"{entry!r}: a /regex/ needs its closing slash")
            try:
                pattern = re.compile(entry[1:end], re.IGNORECASE)
            except re.error as error:
                raise ValueError(f"{entry!r}: bad regex: {error}") from None
            rest = entry[end + 1:].split(None, 1)
        else:
            address, *rest = entry.split(None, 2)
            pattern = re.compile(f"^{re.escape(address.lower())}$", re.IGNORECASE)
        if not rest or rest[0].upper() not in CODES:
            raise ValueError(f"{entry!r}: write PATTERN CODE [message], CODE one of {', '.join(CODES)}")
        message = rest[1].strip() if len(rest) > 1 else "No such user."
        rules.append((pattern, CODES[rest[0].upper()], message))
    return rules


class RcptRegexp(Plugin):
    reject_options = ("reject",)
    configspec = """
    list = force_list(default=list())
    file = path(default="")
    """

    def setup(self):
        self.rules = Entries(self.config["list"], self.config["file"], parse_rules)

    def hook_rcpt(self, session, recipient, params):
        for pattern, code, message in self.rules.get():
            if pattern.search(recipient.address):
                if code in (OK, DECLINED):
                    return code
                return self.reject(message, session, reject_type=code)
        return DECLINED
