"""rcpt_dovecot: accept the recipients Dovecot's userdb knows, refuse the others (550 5.1.1).

For each recipient of ``domains`` (every domain when the list is empty), Dovecot's auth
service is asked over its ``auth-userdb`` socket (the master protocol: ``USER`` lookup,
what ``doveadm user`` does): a user it finds is accepted (OK, put this plugin before
``rcpt_ok``); one it does not is refused ``550 5.1.1 <address>: no such user here``
(``reject = 0`` only logs). The name looked up is the whole address, or its local part
with ``lookup = localpart`` (for a userdb keyed by ``%n``), in lower case. Recipients of other domains
are left to later plugins.

Answers are cached per worker: ``cache_ttl`` seconds for a user found, ``negative_ttl``
for one not found (0 turns caching off), at most ``cache_size`` names.

When Dovecot cannot answer (socket refused, no answer within ``lookup_timeout`` seconds,
a reply the protocol does not allow, or its userdb's ``FAIL``), ``on_failure`` decides:
``tempfail`` (default, 451 4.4.3), ``accept`` (the recipient is accepted unchecked) or
``reject`` (550 5.4.3). Such failures are not cached.

Options:
  socket          Dovecot's auth-userdb socket: /path or host:port (required)
  domains         the domains to check (default: every domain)
  lookup          address or localpart (default address)
  service         the service name Dovecot sees (default smtp)
  lookup_timeout  seconds for one lookup (default 5)
  on_failure      tempfail, accept or reject (default tempfail)
  cache_ttl, negative_ttl, cache_size   (defaults 300, 60, 10000)

Example::

    [[rcpt_dovecot]]
      socket = /run/dovecot/auth-userdb
      domains = example.org, example.net
"""

from __future__ import annotations

from typing import Any

from qpgevent import directory, dovecot
from qpgevent.plugin import DECLINED, OK, Plugin
from qpgevent.scanner import check_address


class RcptDovecot(Plugin):
    configspec = [
        "socket = string",
        "domains = force_list(default=list())",
        'lookup = option("address", "localpart", default="address")',
        'service = string(default="smtp")',
        *directory.CONFIGSPEC,
        *directory.CACHE_CONFIGSPEC,
    ]

    def setup(self) -> None:
        check_address(self.config["socket"])
        self.domains = {domain.lower() for domain in self.config["domains"]}
        self.cache = directory.TtlCache.from_config(self.config)

    def hook_rcpt(self, session: Any, recipient: Any, params: Any) -> Any:
        domain = recipient.host.lower()
        if not recipient.user or (self.domains and domain not in self.domains):
            return DECLINED
        address = f"{recipient.user}@{domain}"
        name = recipient.user if self.config["lookup"] == "localpart" else address
        try:
            known = self.cache.fetch(name.lower(), self._lookup)
        except directory.Unavailable as error:
            return directory.fallback(self, "rcpt", "Dovecot userdb", error)
        if known:
            return OK
        return self.reject(directory.NO_SUCH_USER.format(address=address), session)

    def _lookup(self, name: str) -> bool | None:
        found = dovecot.lookup(self.config["socket"], self.config["lookup_timeout"], name, "USER",
                               self.config["service"])
        return True if found else None
