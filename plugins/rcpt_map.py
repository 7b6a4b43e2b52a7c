"""rcpt_map: decide the recipients of one domain from a map file.

For recipients at ``domain``, the map ``file`` says what to do: each line is
``ADDRESS CODE [message]``, the address written in full (``info@example.org``) or as
its local part (``info``), or ``@example.org`` for every other address of the domain
(the catch-all, which takes the place of ``default``); CODE one of OK, DENY, DENYSOFT,
DENY_DISCONNECT, DENYSOFT_DISCONNECT or DECLINED. As in a Postfix map, ``#`` starts a
comment and a line that starts with whitespace continues the line before (a long
message). An ``@domain`` line for another domain is an error: this map is for one.
OK accepts the recipient (put this plugin before ``rcpt_ok``); a refusal gets the
message, or ``No such user.``. Recipients of the domain that are not in the map get
the catch-all, or else ``default``: ``CODE[=message]``, where ``_`` stands for a space
(qpsmtpd's syntax; default ``DENY=No_such_user.``). Other domains are left to later
plugins. The map is re-read when it changes; at start, a missing or
empty map, or a line without a valid code, is an error.

Fixed from qpsmtpd's rcpt_map: each instance has its own map (two instances for two
domains no longer share one), and addresses in the map match whatever their case.

Options (``reject = 0`` only logs what would have been refused; ``reject_type`` is not
used, the map gives the codes):
  domain   the domain this map is for (required)
  file     the map file (required)
  default  the decision for addresses of the domain not in the map

Example::

    [[rcpt_map]]
      domain = example.org
      file = map_example_org
      default = "DENYSOFT=Mailbox_not_ready,_try_later"   # quoted: a comma makes a list
"""

from qpgevent.plugin import DECLINED, OK, Plugin, ReturnCode
from qpgevent.policy import ListFile, read_logical_lines

CODES = {code.name: code for code in ReturnCode if code is not ReturnCode.DONE}
NO_SUCH_USER = "No such user."


def parse_decision(code: str, message: str, where: str) -> tuple[ReturnCode, str]:
    if code.upper() not in CODES:
        raise ValueError(f"{where}: {code!r} is not one of {', '.join(CODES)}")
    return CODES[code.upper()], message.strip() or NO_SUCH_USER


class RcptMap(Plugin):
    configspec = """
    domain = string
    file = path
    default = string(default="DENY=No_such_user.")
    """

    def setup(self):
        self.domain = self.config["domain"].lower().strip()
        code, _, message = self.config["default"].partition("=")
        self.default = parse_decision(code, message.replace("_", " "), "default")
        self.map = ListFile(self.config["file"], self._parse, read_logical_lines)

    def _parse(self, entries):
        decisions = {}
        for entry in entries:
            words = entry.split(None, 2)
            if len(words) < 2:
                raise ValueError(f"{entry!r}: write ADDRESS CODE [message]")
            address = words[0].lower()
            if address.startswith("@") and address[1:] != self.domain:
                raise ValueError(f"{entry!r}: this map is for {self.domain}")
            if "@" not in address:
                address = f"{address}@{self.domain}"
            decisions[address] = parse_decision(words[1], words[2] if len(words) > 2 else "", entry)
        if not decisions:
            raise ValueError("the map is empty")
        return decisions

    def hook_rcpt(self, session, recipient, params):
        if recipient.host != self.domain or not recipient.user:
            return DECLINED
        address = f"{recipient.user.lower()}@{recipient.host}"
        decisions = self.map.get()
        code, message = decisions.get(address) or decisions.get("@" + self.domain, self.default)
        if code in (OK, DECLINED):
            return code
        if self.config["reject"] == "0":
            self.log.info("fail, tolerated: %s %s %s", address, code.name, message)
            return DECLINED
        return code, message
