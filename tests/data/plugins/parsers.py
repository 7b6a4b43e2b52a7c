"""parsers: a test plugin for the *_parse hooks: it mends what old clients write.

- ``HELO``/``EHLO`` with a host in capitals: the host is taken in lower case (ehlo_parse,
  helo_parse); ``EHLO localhost`` is refused (501) by ehlo_parse.
- ``MAIL FROM <a@b>`` / ``RCPT TO <c@d>`` (a space where the colon goes): mended to
  ``FROM:<a@b>`` / ``TO:<c@d>`` (mail_parse, rcpt_parse).
- ``AUTH X-OLD-PLAIN <initial>``: taken as ``AUTH PLAIN <initial>`` (auth_parse).
The hello host as the ehlo/helo hook saw it goes into the ``seen_host`` note.
"""

from qpgevent.plugin import DECLINED, DENY, OK, Plugin


class Parsers(Plugin):
    def hook_helo_parse(self, session, argument):
        return OK, argument.lower()

    def hook_ehlo_parse(self, session, argument):
        if argument.lower() == "localhost":
            return DENY, "localhost is not your name"
        return OK, argument.lower()

    def hook_helo(self, session, host):
        session.notes["seen_host"] = host
        return DECLINED

    def hook_ehlo(self, session, host):
        session.notes["seen_host"] = host
        return DECLINED

    def hook_mail_parse(self, session, argument):
        if argument.upper().startswith("FROM <"):
            return OK, "FROM:" + argument[5:]
        return DECLINED

    def hook_rcpt_parse(self, session, argument):
        if argument.upper().startswith("TO <"):
            return OK, "TO:" + argument[3:]
        return DECLINED

    def hook_auth_parse(self, session, argument):
        mechanism, _, rest = argument.partition(" ")
        if mechanism.upper() == "X-OLD-PLAIN":
            return OK, f"PLAIN {rest}".strip()
        return DECLINED
