"""rcpt_ldap: accept the recipients an LDAP directory knows, refuse the others (550 5.1.1), expand aliases.

For each recipient of ``domains`` (every domain when the list is empty), the directory
is searched under ``base`` for an entry whose ``address_attributes`` (``mail``, and
``mailLocalAddress`` or ``mailAlternateAddress``, as your schema has them) hold the
address, with ``filter`` (if given) ANDed to it. The address is escaped per RFC 4515:
``*``, ``(``, ``)`` and ``\\`` in it match only themselves; one with a control
character (NUL) is unknown. An entry is found: the recipient is accepted (OK; put this
plugin before ``rcpt_ok``). None: refused ``550 5.1.1 <address>: no such user here``
(``reject = 0`` only logs). Recipients of other domains are left to later plugins.
Addresses are looked up in lower case. Quote DNs in the config (``base =
"dc=example,dc=org"``): a bare comma makes a list.

Aliases: with ``alias_attribute`` (``mailRoutingAddress``, ``mailForwardingAddress``...),
an entry holding it is an alias: the client is told the recipient is OK, and at DATA
(or before queueing, if another plugin answered DATA first) the recipient is replaced
in the envelope by the attribute's addresses (every entry
found counts; one without the attribute stands for the address itself). One level:
the targets are not looked up again. Until DATA, the transaction note
``rcpt_ldap.aliases`` maps each alias (an Address) to its targets.

Answers are cached per worker: ``cache_ttl`` seconds for an address found (with its
alias targets), ``negative_ttl`` for one not found (0 turns caching off), at most
``cache_size`` addresses. When the directory cannot answer (refused, no answer within
``lookup_timeout`` seconds, an error result), ``on_failure`` decides: ``tempfail``
(default, 451 4.4.3), ``accept`` (the recipient is accepted unchecked) or ``reject``
(550 5.4.3). Such failures are not cached. Searches are made with ``ldap3`` (pure
Python, cooperative under gevent; python-ldap's C calls would block every session of
the worker), as ``bind_dn`` (anonymously if empty), on connections kept open for the
next search (one the directory closed is replaced).

Options:
  uri                 ldap://host:port or ldaps://host:port (required)
  base                where to search (required)
  address_attributes  attributes holding a recipient's addresses (default mail)
  filter              more conditions, ANDed (default none), e.g. (objectClass=inetOrgPerson)
  alias_attribute     attribute whose addresses replace the recipient (default none)
  domains             the domains to check (default: every domain)
  bind_dn, bind_password   who searches (default anonymous)
  starttls            StartTLS (RFC 4513 3) before binding on an ldap:// URI (default no)
  ca_file             the CAs to verify the directory's certificate with, for ldaps:// or
                      starttls (default: the system's); its name must match the URI's host
  lookup_timeout      seconds for one search (default 5)
  on_failure          tempfail, accept or reject (default tempfail)
  cache_ttl, negative_ttl, cache_size   (defaults 300, 60, 10000)

Example::

    [[rcpt_ldap]]
      uri = ldap://127.0.0.1:389
      base = "dc=example,dc=org"
      address_attributes = mail, mailLocalAddress
      alias_attribute = mailRoutingAddress
      domains = example.org
"""

from __future__ import annotations

from typing import Any

from qpgevent import directory, ldap_client
from qpgevent.address import Address, AddressError
from qpgevent.plugin import DECLINED, OK, Plugin

ALIASES = "rcpt_ldap.aliases"  #: transaction note: recipient -> the addresses that replace it


class RcptLdap(Plugin):
    configspec = [
        *ldap_client.CONFIGSPEC,
        "base = string",
        "address_attributes = force_list(default=list('mail'))",
        'filter = string(default="")',
        'alias_attribute = string(default="")',
        "domains = force_list(default=list())",
        *directory.CONFIGSPEC,
        *directory.CACHE_CONFIGSPEC,
    ]

    def setup(self) -> None:
        if not self.config["address_attributes"]:
            raise ValueError("address_attributes is empty")
        self.domains = {domain.lower() for domain in self.config["domains"]}
        self.cache = directory.TtlCache.from_config(self.config)
        self.directory = ldap_client.Directory.from_config(self.config)

    def hook_rcpt(self, session: Any, recipient: Any, params: Any) -> Any:
        domain = recipient.host.lower()
        if not recipient.user or (self.domains and domain not in self.domains):
            return DECLINED
        address = f"{recipient.user}@{domain}".lower()
        try:
            targets = self.cache.fetch(address, self._lookup)
        except directory.Unavailable as error:
            return directory.fallback(self, "rcpt", "LDAP", error)
        if targets is None:
            return self.reject(directory.NO_SUCH_USER.format(address=address), session)
        if targets != (address,):
            self.log.info("%s is an alias of %s", address, ", ".join(targets))
            session.transaction.notes.setdefault(ALIASES, {})[recipient] = targets
        return OK

    def hook_data(self, session: Any) -> Any:
        """The envelope is final at DATA: put the aliases' targets in place of the aliases.

        Again just before queueing, in case a plugin before this one answered DATA itself
        (its OK ends the hook's chain); the note is gone once done, so it is done once.
        """
        transaction = session.transaction
        aliases = transaction.notes.pop(ALIASES, {})
        if not aliases:
            return DECLINED
        recipients: list[Any] = []
        for recipient in transaction.recipients:
            for target in self._addresses(aliases.get(recipient), recipient):
                if target not in recipients:
                    recipients.append(target)
        transaction.recipients[:] = recipients
        return DECLINED

    hook_queue_pre = hook_data

    def _addresses(self, targets: tuple[str, ...] | None, recipient: Any) -> list[Any]:
        if targets is None:
            return [recipient]
        addresses = []
        for target in targets:
            try:
                addresses.append(Address.parse(f"<{target}>", smtputf8=True))
            except AddressError as error:
                self.log.error("alias target %r of %s is not an address (%s): skipped", target, recipient, error)
        return addresses or [recipient]

    def _lookup(self, address: str) -> tuple[str, ...] | None:
        """None if no entry has the address; else the addresses mail to it goes to."""
        try:
            value = ldap_client.filter_value(address)
        except ValueError:
            return None  # a control character: no such address (and slapd would ignore what follows a NUL)
        search = "(|%s)" % "".join(f"({name}={value})" for name in self.config["address_attributes"])
        if self.config["filter"]:
            search = f"(&{self.config['filter']}{search})"
        alias = self.config["alias_attribute"]
        entries = self.directory.search(self.config["base"], search, [alias] if alias else [])
        if not entries:
            return None
        targets: list[str] = []
        for _, attributes in entries:
            for target in attributes.get(alias, []) or [address]:
                if target.lower() not in targets:
                    targets.append(target.lower())
        return tuple(targets)
