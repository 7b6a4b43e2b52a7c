"""auth/ldap: check AUTH PLAIN and LOGIN passwords by binding to an LDAP directory as the user.

The user's entry is found by a search (``filter``, ``%s`` standing for the user name as
the client typed it, escaped per RFC 4515 so that ``*``, ``(``, ``)`` and ``\\`` match
only themselves; a name with a control character such as NUL is unknown), under
``base``, as ``bind_dn`` (anonymously if empty); then the plugin binds as that entry's
DN with the client's password. The bind succeeds: OK (235). The password is wrong:
DENY (535 5.7.8). No entry matches: DECLINED, so a later auth plugin may know the user
(back ends are asked in the order of the config); if none does, 535 all the same. More
than one entry matches: refused (the filter is too wide; logged). Quote DNs in the
config (``base = "ou=people,dc=example,dc=org"``): a bare comma makes a list.

Or, with ``dn_template`` (``uid=%s,ou=people,dc=example,dc=org``, ``%s`` escaped per RFC
4514), no search: the plugin binds to the DN made from the user name. A directory
answers a bind to a DN that does not exist as it answers a wrong password, so in this
mode an unknown user is refused (DENY), not passed on.

An empty password is never sent (RFC 4513 5.1.2: it would be an unauthenticated bind,
which succeeds). CRAM-MD5 cannot be checked by a bind; PLAIN and LOGIN are offered
(only inside TLS unless ``[auth]`` says otherwise).

``ldap3`` (pure Python, ``pip install 'qpgevent[ldap]'``) is used on purpose: under gevent
its sockets are cooperative. python-ldap's calls run in libldap's C code and would block
the whole worker while the directory thinks. Searches reuse open connections (a few kept
per worker; one the directory closed is replaced); each bind as a user has its own.

When the directory cannot answer (refused, no answer within ``lookup_timeout`` seconds,
an error result), ``on_failure`` decides: ``tempfail`` (default, 454 4.7.0), ``accept``
(authenticated!) or ``reject`` (535). That answer ends the chain, for every user: put back
ends that do not depend on the directory before this one.

Options:
  uri             ldap://host:port or ldaps://host:port (required)
  base            where to search (required unless dn_template)
  filter          the search filter (default ``(uid=%s)``)
  dn_template     bind to this DN instead of searching
  bind_dn, bind_password   who searches (default anonymous)
  starttls        StartTLS (RFC 4513 3) before binding on an ldap:// URI (default no)
  ca_file         the CAs to verify the directory's certificate with, for ldaps:// or
                  starttls (default: the system's); its name must match the URI's host
  lookup_timeout  seconds for one search or bind (default 5)
  on_failure      tempfail, accept or reject (default tempfail)

Example::

    [[auth/ldap]]
      uri = ldap://127.0.0.1:389
      base = "ou=people,dc=example,dc=org"
      filter = (&(objectClass=inetOrgPerson)(mail=%s))
"""

from __future__ import annotations

from typing import Any

from qpgevent import directory, ldap_client
from qpgevent.plugin import DECLINED, DENY, OK, Plugin


class Ldap(Plugin):
    configspec = [
        *ldap_client.CONFIGSPEC,
        'base = string(default="")',
        'filter = string(default="(uid=%s)")',
        'dn_template = string(default="")',
        *directory.CONFIGSPEC,
    ]

    def setup(self) -> None:
        template = self.config["dn_template"] or self.config["filter"]
        if "%s" not in template:
            raise ValueError(f"{template!r} has no %s for the user name")
        if not self.config["dn_template"] and not self.config["base"]:
            raise ValueError("give base (to search) or dn_template")
        self.directory = ldap_client.Directory.from_config(self.config)

    def hook_auth(self, session: Any, mechanism: str, user: str, password: str, ticket: Any) -> Any:
        if ticket is not None:
            return DECLINED  # CRAM-MD5: a bind needs the password itself
        try:
            dns = self._find(user)
            if not dns:
                return DECLINED
            if len(dns) > 1:
                self.log.warning("%d LDAP entries for %s: refused (the filter must find one)", len(dns), user)
                return DENY
            if self.directory.check_password(dns[0], password):
                return OK
        except directory.Unavailable as error:
            return directory.fallback(self, "auth", "LDAP", error)
        self.log.info("LDAP refused the password of %s", user)
        return DENY  # default words: the reply must not tell which users exist

    def _find(self, user: str) -> list[str]:
        """The DNs the user name leads to: one, or none when the directory has no such user."""
        try:
            value = (ldap_client.dn_value if self.config["dn_template"] else ldap_client.filter_value)(user)
        except ValueError:
            self.log.info("user name %r cannot be in the directory", user)
            return []
        if self.config["dn_template"]:
            return [self.config["dn_template"].replace("%s", value)]
        search = self.config["filter"].replace("%s", value)
        dns = [dn for dn, _ in self.directory.search(self.config["base"], search, [])]
        if not dns:
            self.log.info("no LDAP entry for %s", user)
        return dns
