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

PLAIN and LOGIN are offered (only inside TLS unless ``[auth]`` says otherwise);
``secured`` is sent to Dovecot when the session is in TLS. ``mechanisms`` adds the
mechanisms in which Dovecot makes the challenges (CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256,
as its ``auth_mechanisms`` and passdb allow: they need passwords stored in plaintext or
in the mechanism's scheme): each AUTH with one of them opens its own connection to
Dovecot and relays every step, Dovecot's ``CONT`` as our 334 and the client's answer
back, until Dovecot says ``OK`` (235, as the user Dovecot names) or ``FAIL`` (535; an
exchange cannot be handed to another back end half done). ``mechanisms = all`` offers
every mechanism Dovecot lists when qpgevent starts, but PLAIN and LOGIN (asked at start
up: if Dovecot is down then, none is added). A CRAM-MD5 from this plugin replaces the
built-in one (whose challenge qpgevent makes): Dovecot checks it instead of an
``auth_cram_md5`` plugin. ``on_failure = accept`` cannot name the user of such an
exchange: it gets 454 there.

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
  mechanisms      more mechanisms to relay to Dovecot, e.g. CRAM-MD5, SCRAM-SHA-256, or all
                  (default none)
  lookup_timeout  seconds for one exchange with Dovecot (default 5)
  on_failure      tempfail, accept or reject (default tempfail)

Example::

    [[auth/dovecot]]
      socket = /run/dovecot/auth-client
      userdb_socket = /run/dovecot/auth-userdb
      mechanisms = CRAM-MD5, SCRAM-SHA-256
"""

from __future__ import annotations

import base64
import weakref
from typing import Any

from qpgevent import directory, dovecot
from qpgevent.plugin import DECLINED, DENY, OK, Plugin
from qpgevent.scanner import check_address

PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")  #: checked through the password hook, not relayed


class Dovecot(Plugin):
    configspec = [
        "socket = string",
        'userdb_socket = string(default="")',
        'service = string(default="smtp")',
        "mechanisms = force_list(default=list())",
        *directory.CONFIGSPEC,
    ]

    def setup(self) -> None:
        check_address(self.config["socket"])
        if self.config["userdb_socket"]:
            check_address(self.config["userdb_socket"])
        wanted = [name.upper() for name in self.config["mechanisms"]]
        if wanted == ["ALL"]:
            try:
                wanted = list(dovecot.mechanisms(self.config["socket"], self.config["lookup_timeout"]))
            except directory.Unavailable as error:
                self.log.warning("mechanisms = all: Dovecot unavailable, no mechanism added: %s", error)
                wanted = []
        #: The extension point: these AUTH mechanisms are ours (hook_auth_sasl), relayed.
        self.sasl_mechanisms = tuple(name for name in wanted if name not in PASSWORD_MECHANISMS)
        self.sasl_first_challenge = True  # Dovecot makes the first challenge (CRAM-MD5's)
        self._relays: weakref.WeakKeyDictionary[Any, dovecot.SaslRelay] = weakref.WeakKeyDictionary()
        #: Dovecot said OK with success data (SCRAM's server signature): RFC 4954 sends it as
        #: one more 334, and the 235 follows the client's empty answer.
        self._succeeded: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def hook_auth_sasl(self, session: Any, mechanism: str, response: bytes | None) -> Any:
        """Relay one step of the client's exchange to Dovecot; its CONT is our challenge."""
        if (user := self._succeeded.pop(session, None)) is not None and session.auth_step > 0:
            return (OK, user) if not response else DENY
        if session.auth_step == 0:
            self._forget(session)  # an exchange the client cancelled (*) ends here
            connection = session.connection
            relay = self._relays[session] = dovecot.SaslRelay(
                self.config["socket"], self.config["lookup_timeout"], mechanism,
                remote_ip=connection.remote_ip, local_ip=connection.local_ip,
                secured=bool(connection.tls), service=self.config["service"])
            step = lambda: relay.start(response)  # noqa: E731
        elif (relay := self._relays.get(session)) is not None:
            step = lambda: relay.step(response or b"")  # noqa: E731
        else:
            return DECLINED
        try:
            reply = step()
        except directory.Unavailable as error:
            self._forget(session)
            return directory.fallback(self, "auth", "Dovecot", error)
        if reply.kind == "CONT":
            return session.challenge(reply.challenge)
        self._forget(session)
        if reply.kind == "OK" and reply.fields.get("user"):
            if reply.fields.get("resp"):
                self._succeeded[session] = reply.fields["user"]
                return session.challenge(base64.b64decode(reply.fields["resp"]))
            return OK, reply.fields["user"]
        self.log.info("Dovecot refused a %s exchange", mechanism)
        return DENY

    def hook_disconnect(self, session: Any) -> Any:
        self._forget(session)
        return DECLINED

    def _forget(self, session: Any) -> None:
        self._succeeded.pop(session, None)
        relay = self._relays.pop(session, None)
        if relay is not None:
            relay.close()

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
