"""Pieces of command arguments: AUTH and its responses (strict base64), ``<path> PARAM=...``
(MAIL, RCPT).

Pure functions over strings, used by the protocol core (``core/protocol.py``).
"""

from __future__ import annotations

import base64
import binascii
import re

from .events import Auth, AuthResponse, Rejected
from .reply import Canned
from .wire import BareLineEnding, LineTooLong

_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}$")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 5321 4.1.2 esmtp-keyword


def decode_base64(data: bytes) -> bytes | None:
    """Strict base64 (RFC 4648 4), or None: binascii alone skips junk characters."""
    if len(data) % 4 or not _BASE64.match(data):
        return None
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        return None


def split_path(text: str) -> tuple[str, list[str]]:
    """Split ``<path> PARAM=1 PARAM`` into the path and its parameters.

    The path ends at the ``>`` that is not inside a quoted string, so ``<"a b"@x>`` keeps
    its space. Without brackets the path is the first word (mail_pre may fix it up).
    """
    if not text.startswith("<"):
        first, _, rest = text.partition(" ")
        return first, rest.split()
    close = _closing_bracket(text)
    rest = text[close + 1:]
    if close < 0 or (rest and not rest.startswith(" ")):
        return "", []
    return text[:close + 1], rest.split()


def _closing_bracket(text: str) -> int:
    """Where the ``>`` that ends the path is in ``text``, or -1."""
    if '"' not in text:
        return text.find(">")  # nothing quoted: the first one
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def parse_auth(verb: str, argument: str, line: str) -> Auth | Rejected:
    """``AUTH mechanism [initial-response]`` (RFC 4954 4)."""
    mechanism, _, initial = argument.partition(" ")
    if not mechanism or " " in initial.strip(" ") or not _KEYWORD.match(mechanism):
        return Rejected(Canned.SYNTAX, line)
    initial = initial.strip(" ")
    if not initial:
        return Auth(verb, argument, line, mechanism=mechanism.upper())
    if initial == "=":  # RFC 4954 4: "=" is an empty initial response
        return Auth(verb, argument, line, mechanism=mechanism.upper(), initial=b"")
    decoded = decode_base64(initial.encode("ascii", "replace"))
    if decoded is None:
        return Rejected(Canned.BAD_BASE64, line)
    return Auth(verb, argument, line, mechanism=mechanism.upper(), initial=decoded)


def parse_auth_response(raw: bytes | LineTooLong | BareLineEnding) -> AuthResponse | Rejected:
    """A line answering our 334: ``*`` cancels, else base64 (RFC 4954 4). Never logged."""
    if isinstance(raw, LineTooLong):
        return Rejected(Canned.COMMAND_TOO_LONG)
    if isinstance(raw, BareLineEnding):
        return Rejected(Canned.BARE_LF_IN_COMMAND)
    if raw.strip() == b"*":
        return Rejected(Canned.AUTH_CANCELLED)
    decoded = decode_base64(raw.strip())
    if decoded is None:
        return Rejected(Canned.BAD_BASE64)
    return AuthResponse(decoded)
