"""RFC 5321 mailbox paths: parsing, formatting, and the Address value plugins see.

``Address.parse`` takes the path exactly as written after ``MAIL FROM:`` or
``RCPT TO:`` (angle brackets included, ESMTP parameters already stripped) and
returns an immutable :class:`Address`; ``Address.format`` writes it back in a
form that parses to the same value. Nothing here does I/O or DNS. Error messages
never echo the client's input, so they are safe in an SMTP reply or a log line.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass, field
from functools import total_ordering

__all__ = ["Address", "AddressError"]

MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # octets, RFC 5321 4.5.3.1.2
MAX_LABEL = 63  # octets, RFC 1035 2.3.4

_ALNUM = frozenset(string.ascii_letters + string.digits)
_ATEXT = _ALNUM | frozenset("!#$%&'*+-/=?^_`{|}~")  # RFC 5322 3.2.3 atext
_LDH = _ALNUM | frozenset("-")
_IPV6_CHARS = frozenset(string.hexdigits + ":.")
# The same sets as regular expressions: a loop over the characters in Python costs more
# than all the rest of a parse. RFC 6531 3.3 (SMTPUTF8) adds every non-ASCII character.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # C0, DEL, C1; lone surrogates


def _one_of(chars: frozenset[str], utf8: bool) -> str:
    return "[" + "".join(map(re.escape, sorted(chars))) + (r"\x80-\U0010ffff" if utf8 else "") + "]"


_DOT_STRING = re.compile(rf"{_one_of(_ATEXT, False)}+(?:\.{_one_of(_ATEXT, False)}+)*")
_UTF8_DOT_STRING = re.compile(rf"{_one_of(_ATEXT, True)}+(?:\.{_one_of(_ATEXT, True)}+)*")
_LABEL = re.compile(f"{_one_of(_LDH, False)}+")
_UTF8_LABEL = re.compile(f"{_one_of(_LDH, True)}+")


class AddressError(ValueError):
    """Raised when a path cannot be parsed; str(e) is a short human reason."""


def _is_dot_string(text: str, utf8: bool) -> bool:
    """Dot-string = Atom *("." Atom) (RFC 5321 4.1.2); RFC 6531 3.3 adds UTF-8 to atext."""
    return (_UTF8_DOT_STRING if utf8 else _DOT_STRING).fullmatch(text) is not None


def _quote_local(user: str) -> str:
    """The shortest local-part that denotes ``user``: a Dot-string if it is one, else quoted."""
    if _is_dot_string(user, utf8=True):
        return user
    # Only DQUOTE and backslash fall outside qtextSMTP; RFC 5321 4.1.2 asks
    # senders not to use quoted-pairs where they are not needed.
    return '"' + user.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _find_close(text: str) -> int:
    """Index of the '>' that ends the path; a '>' inside a quoted local part does not count."""
    if '"' not in text:  # nothing quoted: the first one
        close = text.find(">", 1)
        if close < 0:
            raise AddressError("missing closing '>'")
        return close
    quoted = False
    i = 1
    while i < len(text):
        ch = text[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
        i += 1
    raise AddressError("missing closing '>'")


def _parse_quoted(text: str, utf8: bool) -> tuple[str, int]:
    """Parse the Quoted-string at the start of ``text``; return (content, end index)."""
    out: list[str] = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            # quoted-pairSMTP = %d92 %d32-126 (RFC 5321 4.1.2); RFC 6531 does not extend it.
            i += 1
            if i >= len(text) or not " " <= text[i] <= "~":
                raise AddressError("invalid quoted-pair in local part")
        # qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii (RFC 6531 3.3).
        elif not (" " <= ch <= "~" or (utf8 and not ch.isascii())):
            raise AddressError("invalid character in quoted local part")
        out.append(text[i])
        i += 1
    raise AddressError("unterminated quoted local part")


def _label_octets(label: str) -> int:
    """Length of a label as DNS sees it: the A-label (RFC 5890 2.3.2.1) for a UTF-8 label."""
    if label.isascii():
        return len(label)
    return 4 + len(label.encode("punycode"))  # "xn--" + RFC 3492 encoding


def _parse_domain(text: str, utf8: bool) -> str:
    """Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str] (RFC 5321 4.1.2)."""
    if not text:
        raise AddressError("empty domain")
    # Domain names are case-insensitive (RFC 5321 2.4), so store them lower-cased.
    labels = text.lower().split(".")
    total = len(labels) - 1  # the dots
    for label in labels:
        if not label:
            raise AddressError("empty label in domain")
        # RFC 6531 3.3 lets sub-domain be a U-label: treat non-ASCII as Let-dig.
        if not (_UTF8_LABEL if utf8 else _LABEL).fullmatch(label):
            raise AddressError("invalid character in domain")
        if label[0] == "-" or label[-1] == "-":
            raise AddressError("domain label starts or ends with '-'")
        octets = _label_octets(label)
        if octets > MAX_LABEL:
            raise AddressError("domain label too long")
        total += octets
    if total > MAX_DOMAIN:
        raise AddressError("domain too long")
    return ".".join(labels)


def _parse_literal(text: str) -> str:
    """address-literal = "[" ( IPv4 / IPv6 / General ) "]" (RFC 5321 4.1.3)."""
    if len(text) < 2 or not text.endswith("]"):
        raise AddressError("unterminated address literal")
    inner = text[1:-1]
    if ":" not in inner:
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise AddressError("invalid IPv4 address literal") from None
    tag, _, value = inner.partition(":")
    if tag.lower() != "ipv6":
        # General-address-literal: Standardized-tag ":" 1*dcontent. No tags are
        # registered besides IPv6, so nothing could deliver to one.
        if tag and all(c in _LDH for c in tag):
            raise AddressError("general address literals are not supported")
        raise AddressError("invalid address literal")
    # ipaddress accepts "%scope" suffixes, which RFC 5321 4.1.3 does not.
    if not value or not all(c in _IPV6_CHARS for c in value):
        raise AddressError("invalid IPv6 address literal")
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise AddressError("invalid IPv6 address literal") from None
    return f"[IPv6:{address.compressed}]"


@total_ordering
@dataclass(frozen=True, slots=True)
class Address:
    """A parsed mailbox path. Not validated on direct construction; use ``parse`` for input.

    ``user`` is the local part unquoted (case kept, RFC 5321 2.4); ``host`` is the
    lower-cased domain, an address literal such as ``[192.0.2.1]`` or
    ``[IPv6:2001:db8::1]``, or ``""`` for the null path and bare postmaster.
    Addresses sort by (host, user).
    """

    user: str
    host: str
    #: DSN (RFC 3461 4.1, 4.2): NOTIFY as given ("NEVER",) or ("SUCCESS", "FAILURE"...), and
    #: ORCPT decoded ("rfc822;user@example.test"); None when the client did not say. Not part
    #: of what the address is (equality, order, hash).
    notify: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
    orcpt: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        smtputf8: bool = False,
        allow_null: bool = True,
        allow_postmaster: bool = False,
    ) -> Address:
        """Parse ``text`` ("<user@host>"); raise AddressError if it is not a valid path."""
        bad = _CONTROL.search(text)
        if bad is not None:
            if ord(bad.group()) < 0xD800:  # C0, DEL and C1 controls
                raise AddressError("control character in path")
            raise AddressError("invalid UTF-8 in path")  # lone surrogates: undecodable input bytes
        if not smtputf8 and not text.isascii():
            # RFC 6531 3.3: non-ASCII paths need the SMTPUTF8 parameter.
            raise AddressError("non-ASCII address requires SMTPUTF8")
        if not text.startswith("<"):
            raise AddressError("path must be enclosed in angle brackets")
        close = _find_close(text)
        if close != len(text) - 1:
            raise AddressError("unexpected text after '>'")
        inner = text[1:close]

        if not inner:  # "<>": the null reverse-path, RFC 5321 4.5.5
            if not allow_null:
                raise AddressError("null path not allowed here")
            return cls.null()
        if inner.lower() == "postmaster":  # RFC 5321 4.1.1.3 / 4.5.1, case-insensitive
            if not allow_postmaster:
                raise AddressError("postmaster without a domain not allowed here")
            return cls(inner, "")

        if inner.startswith("@"):
            # Source route (A-d-l ":"): accepted and ignored, RFC 5321 4.1.2 and
            # Appendix C. Route hops are Domains only, so the first ':' ends it.
            route, colon, inner = inner.partition(":")
            if not colon:
                raise AddressError("source route without a mailbox")
            for hop in route.split(","):
                if not hop.startswith("@"):
                    raise AddressError("invalid source route")
                _parse_domain(hop[1:], smtputf8)

        if inner.startswith('"'):
            user, end = _parse_quoted(inner, smtputf8)
        else:
            end = inner.find("@")
            end = len(inner) if end < 0 else end
            user = inner[:end]
            if not user:
                raise AddressError("empty local part")
            if not _is_dot_string(user, smtputf8):
                raise AddressError("invalid local part")
        # Measured as written (quotes and escapes included), in octets.
        if len(inner[:end].encode("utf-8")) > MAX_LOCAL_PART:
            raise AddressError("local part too long")

        rest = inner[end:]
        if not rest:
            raise AddressError("missing domain")
        if not rest.startswith("@"):
            raise AddressError("invalid local part")
        domain = rest[1:]
        if domain.startswith("["):
            host = _parse_literal(domain)
        else:
            host = _parse_domain(domain, smtputf8)
        return cls(user, host)

    @classmethod
    def null(cls) -> Address:
        """The null reverse-path "<>"."""
        return cls("", "")

    @property
    def is_null(self) -> bool:
        return not self.user and not self.host

    @property
    def is_ascii(self) -> bool:
        """False if delivering to/from this address needs SMTPUTF8."""
        return self.user.isascii() and self.host.isascii()

    @property
    def address(self) -> str:
        """"user@host" without brackets, for display and logs; "" for the null path."""
        if self.is_null:
            return ""
        if not self.host:
            return self.user  # bare postmaster
        return f"{_quote_local(self.user)}@{self.host}"

    def format(self) -> str:
        """The path as written in SMTP: "<user@host>", "<>" or "<postmaster>"."""
        return f"<{self.address}>"

    def __str__(self) -> str:
        return self.format()

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Address):
            return NotImplemented
        return (self.host, self.user) < (other.host, other.user)
