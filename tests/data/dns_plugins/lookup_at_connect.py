"""lookup_at_connect: a test plugin that resolves a name before the greeting.

Looks ``name`` up (A records) through the default resolver at connect. The greeting
comes when the answer holds ``expect``; a wrong answer is refused with 554; a DNS that
cannot answer now (``dns.TemporaryFailure``) gets 421, try again later.

Options:
  name    the name to look up (default mail.example.test)
  expect  the address it must have (default 192.0.2.25)
"""

from qpgevent import dns
from qpgevent.plugin import DECLINED, DENY, DENYSOFT, Plugin


class LookupAtConnect(Plugin):
    configspec = ['name = string(default="mail.example.test")',
                  'expect = string(default="192.0.2.25")']

    def hook_connect(self, session):
        try:
            found = dns.default().a(self.config["name"])
        except dns.TemporaryFailure as error:
            return DENYSOFT, f"cannot look {self.config['name']} up now: {error}"
        if self.config["expect"] not in found:
            return DENY, f"{self.config['name']} has {found}, not {self.config['expect']}"
        session.notes["lookup_at_connect"] = found
        return DECLINED
