"""LDAP for plugins: search a directory, check a password by binding; every call bounded, failures one kind.

Built on ``ldap3`` (pure Python: its sockets are the standard library's, which gevent
makes cooperative, so a slow directory stalls only the session waiting on it).
``python-ldap`` is not usable here: its calls run inside libldap's C code, which would
block the whole worker (every session) for as long as the server takes.

``Directory(uri, timeout, bind_dn, bind_password)`` searches on connections bound as
``bind_dn`` (anonymously when empty), kept open for the next search; a password is
checked by binding on a connection of its own, closed after. ``ldap://host:port`` or
``ldaps://``; each call runs under ``timeout`` seconds in all. A refused
connection, a timeout, or any result other than success (and, for ``check_password``,
invalidCredentials) raises ``directory.Unavailable``. Values put into filters or DNs
must go through ``filter_value`` / ``dn_value``: they escape ``*``, ``(``, ``)``, ``\\``
(RFC 4515 3) and DN specials (RFC 4514 2.4), so a user name cannot widen a search, and
refuse control characters (NUL), which escaping does not make harmless.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn

from .directory import Unavailable
from .scanner import scan_deadline

__all__ = ["CONFIGSPEC", "Directory", "filter_value", "dn_value", "Entry"]

#: Idle search connections kept per Directory (per plugin, per worker); more are opened
#: when more sessions search at once, and closed after.
POOL_SIZE = 8
#: RFC 4511 4.1.9 resultCode 49: the password (or the DN) is wrong; the directory is fine.
INVALID_CREDENTIALS = 49

Entry = tuple[str, dict[str, list[str]]]  #: (dn, attribute -> values)


def filter_value(text: str) -> str:
    """``text`` as a literal value inside a search filter (RFC 4515 3); ValueError for controls.

    Escaping is not enough for NUL: slapd 2.5 compares an IA5 value only up to an
    escaped ``\\00``, so ``alice@example.test<NUL>`` found alice's entry. No user
    name or address holds a control character: they are refused here.
    """
    _no_controls(text)
    return escape_filter_chars(text)


def dn_value(text: str) -> str:
    """``text`` as a literal attribute value inside a DN (RFC 4514 2.4); ValueError for controls."""
    _no_controls(text)
    return escape_rdn(text)


def _no_controls(text: str) -> None:
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValueError("control character in a directory value")


#: The options both LDAP plugins take to reach the directory (``Directory.from_config``).
CONFIGSPEC = [
    "uri = string",
    'bind_dn = string(default="")',
    'bind_password = string(default="")',
    "starttls = boolean(default=False)",
    'ca_file = path(default="")',
]


class Directory:
    """``ldaps://`` URIs and ``starttls`` (RFC 4513 3) verify the server's certificate
    against ``ca_file`` (or the system's CAs) and its name against the URI's host."""

    def __init__(self, uri: str, timeout: float, bind_dn: str = "", bind_password: str = "",
                 starttls: bool = False, ca_file: str = "") -> None:
        self.uri, self.timeout = uri, timeout
        self.bind_dn, self.bind_password = bind_dn, bind_password
        self.starttls = starttls
        self._idle: list[ldap3.Connection] = []  # bound as bind_dn, for searches
        self.tls = None
        if starttls or uri.lower().startswith("ldaps://"):
            self.tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file or None)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Directory:
        return cls(config["uri"], config["lookup_timeout"], config["bind_dn"], config["bind_password"],
                   config["starttls"], config["ca_file"])

    def search(self, base: str, search_filter: str, attributes: list[str]) -> list[Entry]:
        """Entries under ``base`` (whole subtree) matching ``search_filter``, with ``attributes``.

        Searches reuse connections bound as ``bind_dn`` (at most ``POOL_SIZE`` kept idle per
        instance). One that went stale (the directory restarted, or closed it when idle)
        is dropped and the search made once more on a new one, within the same deadline.
        """
        with self._deadline():
            if self._idle:
                connection = self._idle.pop()
                try:
                    return self._search(connection, base, search_filter, attributes)
                except ldap_errors.LDAPCommunicationError:
                    pass  # stale: a new connection below (the failed one is closed)
            return self._search(self._open(self.bind_dn, self.bind_password), base, search_filter, attributes)

    def check_password(self, dn: str, password: str) -> bool:
        """Whether binding as ``dn`` with ``password`` succeeds (on a connection of its own)."""
        if not password:
            return False  # RFC 4513 5.1.2: an empty password is an unauthenticated bind, which "succeeds"
        with self._deadline():
            connection = self._open(dn, password)
            try:
                if self._bind(connection):
                    return True
                if connection.result["result"] == INVALID_CREDENTIALS:
                    return False
                raise Unavailable(f"LDAP bind failed: {connection.result['description']}")
            finally:
                _close(connection)

    def _search(self, connection: ldap3.Connection, base: str, search_filter: str,
                attributes: list[str]) -> list[Entry]:
        """Search on ``connection`` (binding it first if new); kept for reuse if all went well."""
        try:
            if not connection.bound and not self._bind(connection):
                raise Unavailable(f"LDAP bind as {self.bind_dn or 'anonymous'} refused: {connection.result}")
            connection.search(base, search_filter, ldap3.SUBTREE, attributes=attributes or ldap3.NO_ATTRIBUTES)
            if connection.result["result"] not in (0, 32):  # success, noSuchObject (the base is empty)
                raise Unavailable(f"LDAP search failed: {connection.result['description']}")
            entries = [(entry["dn"], {name: _values(value) for name, value in entry["attributes"].items()})
                       for entry in connection.response or () if entry.get("type") == "searchResEntry"]
        except BaseException:
            _close(connection)  # in an unknown state (or the deadline fired mid-reply): never reused
            raise
        if len(self._idle) < POOL_SIZE:
            self._idle.append(connection)
        else:
            _close(connection)
        return entries

    def _bind(self, connection: ldap3.Connection) -> bool:
        """Open, StartTLS if asked (before any password is sent), bind."""
        if self.starttls:
            connection.open()
            if not connection.start_tls():
                raise Unavailable(f"StartTLS refused by {self.uri}: {connection.result}")
        return bool(connection.bind())

    def _open(self, user: str, password: str) -> ldap3.Connection:
        # A new Server each time: ldap3 marks a Server whose connect failed "unavailable"
        # for 5 s, which would outlast the directory's own restart.
        server = ldap3.Server(self.uri, get_info=ldap3.NONE, connect_timeout=self.timeout, tls=self.tls)
        # ldap3 packs receive_timeout into SO_RCVTIMEO as whole seconds (a float is an
        # error); the deadline around the call is the precise limit.
        return ldap3.Connection(server, user or None, password or None, receive_timeout=math.ceil(self.timeout),
                                raise_exceptions=False, read_only=True)

    @contextmanager
    def _deadline(self) -> Iterator[None]:
        """The whole call within ``timeout``; ldap3's and socket errors become Unavailable."""
        try:
            with scan_deadline(self.timeout, f"LDAP server {self.uri}"):
                yield
        except ldap_errors.LDAPException as error:
            raise Unavailable(f"LDAP server {self.uri}: {error}") from None


def _close(connection: ldap3.Connection) -> None:
    try:
        if not connection.closed:
            connection.unbind()
    except (ldap_errors.LDAPException, OSError):
        pass  # closing a connection that already failed: its failure is what gets reported


def _values(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in values]
