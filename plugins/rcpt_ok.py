"""rcpt_ok: accept recipients in our own domains; refuse relaying anywhere else.

The standard last RCPT plugin (qpsmtpd's ``rcpt_ok``). It says OK when:
- the client may relay (``relay_client``, set by the ``relay`` plugin or AUTH);
- the recipient's domain is one of ``domains``, ``me``, or a line of ``rcpthosts``
  (a file, one domain per line; a line ``.example.com`` also takes every subdomain);
- the recipient is a bare ``<postmaster>`` (RFC 5321 4.5.1).
Otherwise: ``550 5.7.1 Relaying denied`` (as the standard ``reject`` / ``reject_type``
say: ``reject = 0`` accepts nothing but refuses nothing either, leaving the recipient to
the core's 450). Put it after every other rcpt plugin.

Options:
  domains    list of local domains (default: none besides ``me``)
  rcpthosts  path of a file of more domains, re-read when it changes (default: none)

Example::

    [[rcpt_ok]]
      domains = localhost, example.test
"""

import os

from qpgevent.plugin import OK, Plugin


class RcptOk(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = """
    domains = force_list(default=list())
    rcpthosts = path(default="")
    """

    def setup(self):
        self._file_domains = frozenset()
        self._file_stamp = None
        if self.config["rcpthosts"]:
            self._reload()

    def hook_rcpt(self, session, recipient, params):
        if session.connection.relay_client:
            return OK
        if recipient.host == "" and recipient.user.lower() == "postmaster":
            return OK
        if self.is_local(recipient.host, session.me):
            return OK
        return self.reject(f"{self.enhanced_status('7.1')} Relaying denied", session)

    def is_local(self, domain, me):
        domain = domain.lower()
        local = {d.lower() for d in self.config["domains"]} | {me.lower()} | self._domains_from_file()
        if domain in local:
            return True
        return any(entry.startswith(".") and domain.endswith(entry) for entry in local)

    def _domains_from_file(self):
        if self.config["rcpthosts"]:
            self._reload()
        return self._file_domains

    def _reload(self):
        path = self.config["rcpthosts"]
        stamp = os.stat(path).st_mtime_ns
        if stamp == self._file_stamp:
            return
        with open(path, encoding="utf-8") as handle:
            lines = [line.split("#", 1)[0].strip().lower() for line in handle]
        self._file_domains = frozenset(line for line in lines if line)
        self._file_stamp = stamp
