"""auth/dovecot: check AUTH PLAIN and LOGIN passwords with Dovecot's auth service (Dovecot SASL).

The password the client sent is checked by Dovecot over its auth socket, in the Dovecot
auth protocol Postfix's ``smtpd_sasl_type = dovecot`` speaks: ``socket`` is the path of
Dovecot's ``auth-client`` unix listener, or ``host:port`` of an ``inet_listener`` of its
``service auth``. Dovecot is asked by PLAIN if it offers it, else by LOGIN; the
client's address goes along (``rip``), so Dovecot's log and its own auth penalty see
the real client. Dovecot says OK: the user is authenticated (235).

Dovecot's ``FAIL`` is the same for a wrong password and an unknown user, so to let
back ends chain, give ``userdb_socket`` (Dovecot's ``auth-userdb`` listener, mode
readable by qpgevent): after a FAIL the plugin asks its passdb whether the user exists
(a ``PASS`` lookup, which returns no password). An unknown user is DECLINED (a later
auth plugin may know them); a known one is refused (DENY, 535 5.7.8). Without
``userdb_socket`` every FAIL is DECLINED: the next back end is asked, and if none
knows the user the client gets 535 all the same. The plugin hooks the generic ``auth``
hook, so back ends are asked in the order of the config.

CRAM-MD5 (and Dovecot's other challenge mechanisms) cannot be passed through: in them
Dovecot makes the challenge, while qpgevent's SASL layer makes its own before any
plugin is asked. PLAIN and LOGIN are offered (only inside TLS unless ``[auth]`` says
otherwise); ``secured`` is sent to Dovecot when the session is in TLS.

When Dovecot cannot answer (socket refused, no answer within ``lookup_timeout`` seconds,
a reply the protocol does not allow, or Dovecot's own ``temp_fail``), ``on_failure``
decides: ``tempfail`` (default, 454 4.7.0), ``accept`` (authenticated!) or ``reject``
(535). That answer ends the chain, for every user: put back ends that do not
depend on Dovecot before this one. One connection per attempt, never shared between
sessions.

Options:
  socket          Dovecot's auth-client socket: /path or host:port (required)
  userdb_socket   Dovecot's auth-userdb socket, to tell unknown users from wrong passwords
  service         the service name Dovecot sees (default smtp)
  lookup_timeout  seconds for one exchange with Dovecot (default 5)
  on_failure      tempfail, accept or reject (default tempfail)

Example::

    [[auth/dovecot]]
      socket = /run/dovecot/auth-client
      userdb_socket = /run/dovecot/auth-userdb
"""

from __future__ import annotations

from typing import Any

from qpgevent import directory, dovecot
from qpgevent.plugin import DECLINED, DENY, OK, Plugin
from qpgevent.scanner import check_address


class Dovecot(Plugin):
    configspec = [
        "socket = string",
        'userdb_socket = string(default="")',
        'service = string(default="smtp")',
        *directory.CONFIGSPEC,
    ]

    def setup(self) -> None:
        check_address(self.config["socket"])
        if self.config["userdb_socket"]:
            check_address(self.config["userdb_socket"])

    def hook_auth(self, session: Any, mechanism: str, user: str, password: str, ticket: Any) -> Any:
        if ticket is not None:
            return DECLINED  # CRAM-MD5: Dovecot would have to make the challenge (see above)
        connection = session.connection
        try:
            result = dovecot.authenticate(self.config["socket"], self.config["lookup_timeout"], user, password,
                                          remote_ip=connection.remote_ip, local_ip=connection.local_ip,
                                          secured=bool(connection.tls), service=self.config["service"])
            if result.ok:
                return OK
            if self._unknown(user):
                self.log.info("Dovecot does not know %s", user)
                return DECLINED
        except directory.Unavailable as error:
            return directory.fallback(self, "auth", "Dovecot", error)
        self.log.info("Dovecot refused the password of %s", user)
        return DENY  # default words: the reply must not tell which users exist

    def _unknown(self, user: str) -> bool:
        if not self.config["userdb_socket"]:
            return True
        return dovecot.lookup(self.config["userdb_socket"], self.config["lookup_timeout"], user, "PASS",
                              self.config["service"]) is None
