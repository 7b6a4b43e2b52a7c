"""The Postfix policy delegation protocol (SMTPD_POLICY_README), as bytes in and values out.

A request is ``name=value`` lines ending in LF, then an empty line; the reply has the same
shape and carries ``action=<an access(5) action>``. Several requests may follow on one
connection. ``encode_request`` makes a request, ``ReplyReader`` finds whole replies in the
bytes as they arrive (keeping what follows for the next one), ``parse_action`` turns the
action text into an ``Action``: what it is, its SMTP code when it refuses, and its text.
No sockets here; ``plugins/policy.py`` does the I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["Kind", "Action", "ProtocolError", "encode_request", "ReplyReader", "parse_action"]

#: Longest reply we wait for; a server that sends more is broken.
MAX_REPLY = 65536


class ProtocolError(ValueError):
    """What the policy server said is not the protocol."""


class Kind(enum.Enum):
    OK = "OK"
    DUNNO = "DUNNO"
    REJECT = "REJECT"  #: also ``5NN text`` and the restriction ``reject``
    DEFER = "DEFER"  #: also ``4NN text``, ``DEFER_IF_PERMIT`` and the restriction ``defer``
    DEFER_IF_REJECT = "DEFER_IF_REJECT"
    PREPEND = "PREPEND"
    HOLD = "HOLD"
    DISCARD = "DISCARD"
    FILTER = "FILTER"
    REDIRECT = "REDIRECT"
    BCC = "BCC"
    WARN = "WARN"
    INFO = "INFO"


@dataclass(frozen=True)
class Action:
    kind: Kind
    text: str = ""  #: the rest of the action: reply text, header, address, transport
    code: int = 0  #: the SMTP reply code, for REJECT and DEFER
    keyword: str = ""  #: the action's first word as the server wrote it (for the logs)

    @property
    def reply(self) -> str:
        """``"554 5.7.1 text"``: the code, an enhanced status code, the text (refusals only)."""
        text = self.text or ("Access denied" if self.kind is Kind.REJECT else "Try again later")
        if not _ENHANCED.match(text):
            text = f"{self.code // 100}.7.1 {text}"
        return f"{self.code} {text}"


_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(\s|$)")
_NUMERIC = re.compile(r"([45])\d\d$")
# access(5) default codes: access_map_reject_code 554, access_map_defer_code 450.
_REJECT_CODE, _DEFER_CODE = 554, 450
_NEEDS_TEXT = {Kind.PREPEND, Kind.FILTER, Kind.REDIRECT, Kind.BCC}


def encode_request(attributes: dict[str, str]) -> bytes:
    """``name=value`` lines and the empty line; a value never carries a line break."""
    lines = []
    for name, value in attributes.items():
        value = " ".join(str(value).splitlines())
        lines.append(f"{name}={value}\n")
    return ("".join(lines) + "\n").encode("utf-8", "surrogateescape")


class ReplyReader:
    """Feed bytes as they arrive; ``next_reply()`` gives each complete reply as a dict."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_reply(self) -> dict[str, str] | None:
        """The next whole reply, or None while it is incomplete; ProtocolError if it is garbage."""
        end = self.buffer.find(b"\n\n")
        if end < 0:
            if len(self.buffer) > MAX_REPLY:
                raise ProtocolError(f"no end of reply in {len(self.buffer)} octets")
            return None
        block = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        reply = {}
        for line in block.decode("utf-8", "replace").split("\n"):
            name, equals, value = line.rstrip("\r").partition("=")
            if not equals or not name:
                raise ProtocolError(f"not name=value: {line[:100]!r}")
            reply[name] = value
        return reply


def parse_action(text: str) -> Action:
    """An access(5) action as policy servers send it; ProtocolError for what Postfix would not take."""
    keyword, _, rest = text.strip().partition(" ")
    rest = rest.strip()
    word = keyword.upper()
    numeric = _NUMERIC.match(keyword)
    if numeric:
        if not rest:
            raise ProtocolError(f"{keyword} without a text")
        return Action(Kind.REJECT if numeric.group(1) == "5" else Kind.DEFER, rest, int(keyword), keyword)
    if word in ("REJECT", "DEFER", "DEFER_IF_PERMIT"):  # the restrictions reject, defer too: any case
        kind = Kind.REJECT if word == "REJECT" else Kind.DEFER
        return Action(kind, rest, _REJECT_CODE if kind is Kind.REJECT else _DEFER_CODE, keyword)
    kind = Kind.OK if word == "PERMIT" else Kind.__members__.get(word)
    if kind is None:
        raise ProtocolError(f"unknown action {text.strip()[:100]!r}")
    if kind in _NEEDS_TEXT and not rest:
        raise ProtocolError(f"{keyword} needs an argument")
    if kind is Kind.PREPEND and not re.match(r"[!-9;-~]+:", rest):
        raise ProtocolError(f"PREPEND {rest[:100]!r} is not a header field")
    return Action(kind, rest, 0, keyword)
