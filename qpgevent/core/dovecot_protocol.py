"""The Dovecot auth protocol, sans-I/O: the lines a client sends and what the replies mean.

Dovecot's auth service speaks two line protocols (fields separated by TAB, lines ended
by LF, values escaped with ``\\x01``: see ``escape``):

- the **client** protocol (socket ``auth-client``, or an ``inet_listener``), what Postfix's
  ``smtpd_sasl_type = dovecot`` speaks: the client says ``VERSION 1 2`` and ``CPID``; the
  server says ``VERSION``, one ``MECH name flags...`` per mechanism, ``SPID``, ``CUID``,
  ``COOKIE`` and ``DONE``. Then ``AUTH id mech service=smtp ... resp=<base64>`` is
  answered ``OK id fields``, ``FAIL id fields`` or ``CONT id <base64 challenge>``,
  which the client answers with ``CONT id <base64 response>``.
- the **master** protocol (socket ``auth-userdb`` or ``auth-master``): the client says
  ``VERSION 1 1``, the server ``VERSION`` and ``SPID``; ``USER id name service=smtp``
  (userdb) or ``PASS id name service=smtp`` (passdb, no password) is answered
  ``USER|PASS id name fields``, ``NOTFOUND id`` or ``FAIL id fields``.

Nothing here touches a socket: ``ClientHandshake`` and ``MasterHandshake`` are fed the
server's lines, ``parse_auth_reply`` and ``parse_lookup_reply`` turn one line into a
value, and anything the server should not have said raises ``ProtocolError``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

__all__ = ["ProtocolError", "ClientHandshake", "MasterHandshake", "AuthReply", "LookupReply",
           "client_hello", "master_hello", "auth_request", "continue_request", "lookup_request",
           "parse_auth_reply", "parse_lookup_reply", "escape", "unescape", "MAX_LINE"]

#: The longest line we accept from the server (Dovecot's own client limit is 16 KiB).
MAX_LINE = 16384
_ESCAPES = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}
_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\0"}


class ProtocolError(ValueError):
    """The server said something the protocol does not allow (or not to us)."""


def escape(value: str) -> str:
    """Dovecot's tab-escaping: the separators can appear inside a value."""
    if "\0" in value:
        raise ValueError("NUL cannot be sent to Dovecot")
    return "".join(_ESCAPES.get(char, char) for char in value)


def unescape(value: str) -> str:
    if "\x01" not in value:
        return value
    out, chars = [], iter(value)
    for char in chars:
        if char == "\x01":
            char = _UNESCAPES.get(next(chars, ""), "")
            if not char:
                raise ProtocolError("bad escape sequence")
        out.append(char)
    return "".join(out)


def _words(line: bytes) -> list[str]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} octets")
    try:
        text = line.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        raise ProtocolError("line is not UTF-8") from None
    return [unescape(word) for word in text.split("\t")]


def _fields(words: list[str]) -> dict[str, str]:
    """``name=value`` words (and bare flags such as ``secured``, as ``name: ""``)."""
    return dict((word.partition("=")[0], word.partition("=")[2]) for word in words)


def _line(*words: str) -> bytes:
    return ("\t".join(words) + "\n").encode("utf-8")


def _version(words: list[str], major: int) -> None:
    if len(words) < 3 or words[1] != str(major):
        raise ProtocolError(f"server speaks version {'.'.join(words[1:3])}, we speak {major}.x")


# -- the client protocol -----------------------------------------------------------


def client_hello(pid: int) -> bytes:
    return _line("VERSION", "1", "2") + _line("CPID", str(pid))


@dataclass
class ClientHandshake:
    """The server's side of the handshake, line by line: ``feed`` says True at ``DONE``."""

    mechanisms: dict[str, tuple[str, ...]] = field(default_factory=dict)  #: name -> flags
    version_seen: bool = False

    def feed(self, line: bytes) -> bool:
        words = _words(line)
        command = words[0]
        if not self.version_seen:
            if command != "VERSION":
                raise ProtocolError(f"expected VERSION, got {command[:40]!r}")
            _version(words, 1)
            self.version_seen = True
        elif command == "MECH" and len(words) >= 2:
            self.mechanisms[words[1].upper()] = tuple(words[2:])
        elif command == "DONE":
            return True
        elif command not in ("SPID", "CUID", "COOKIE"):
            raise ProtocolError(f"unexpected {command[:40]!r} in the handshake")
        return False


def auth_request(request_id: int, mechanism: str, *, service: str = "smtp", secured: bool = False,
                 remote_ip: str = "", local_ip: str = "", initial: bytes | None = None,
                 no_penalty: bool = False) -> bytes:
    """``AUTH``: start one exchange; ``initial`` is the client's initial response, if any."""
    words = ["AUTH", str(request_id), mechanism, "service=" + escape(service)]
    if secured:
        words.append("secured")
    if no_penalty:
        words.append("no-penalty")
    if remote_ip:
        words.append("rip=" + escape(remote_ip))
    if local_ip:
        words.append("lip=" + escape(local_ip))
    if initial is not None:
        words.append("resp=" + base64.b64encode(initial).decode())
    return _line(*words)


def continue_request(request_id: int, data: bytes) -> bytes:
    return _line("CONT", str(request_id), base64.b64encode(data).decode())


@dataclass(frozen=True)
class AuthReply:
    """``OK``, ``FAIL`` or ``CONT`` for one request; ``challenge`` is CONT's decoded data."""

    kind: str
    fields: dict[str, str]
    challenge: bytes = b""

    @property
    def temporary(self) -> bool:
        """Dovecot could not check (its passdb is down): not the client's failure."""
        return self.fields.get("code") == "temp_fail" or "temp" in self.fields


def parse_auth_reply(line: bytes, request_id: int) -> AuthReply:
    words = _words(line)
    if len(words) < 2 or words[0] not in ("OK", "FAIL", "CONT"):
        raise ProtocolError(f"not an AUTH reply: {words[0][:40]!r}")
    if words[1] != str(request_id):
        raise ProtocolError(f"reply for request {words[1][:20]!r}, we asked {request_id}")
    if words[0] != "CONT":
        return AuthReply(words[0], _fields(words[2:]))
    try:
        challenge = base64.b64decode(words[2] if len(words) > 2 else "", validate=True)
    except binascii.Error:
        raise ProtocolError("CONT data is not base64") from None
    return AuthReply("CONT", {}, challenge)


# -- the master (userdb) protocol --------------------------------------------------


def master_hello() -> bytes:
    return _line("VERSION", "1", "1")


@dataclass
class MasterHandshake:
    """The server's ``VERSION`` and ``SPID``: ``feed`` says True after ``SPID``."""

    version_seen: bool = False

    def feed(self, line: bytes) -> bool:
        words = _words(line)
        if not self.version_seen:
            if words[0] != "VERSION":
                raise ProtocolError(f"expected VERSION, got {words[0][:40]!r}")
            _version(words, 1)
            self.version_seen = True
            return False
        if words[0] != "SPID":
            raise ProtocolError(f"unexpected {words[0][:40]!r} in the handshake")
        return True


def lookup_request(request_id: int, kind: str, user: str, service: str = "smtp") -> bytes:
    """``USER`` (does the userdb know this user?) or ``PASS`` (the passdb, without a password)."""
    if kind not in ("USER", "PASS"):
        raise ValueError(kind)
    return _line(kind, str(request_id), escape(user), "service=" + escape(service))


@dataclass(frozen=True)
class LookupReply:
    """``found`` is False for ``NOTFOUND``; ``FAIL`` is an error (``ProtocolError`` is not)."""

    found: bool
    failed: bool = False
    user: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def parse_lookup_reply(line: bytes, request_id: int) -> LookupReply:
    words = _words(line)
    if len(words) < 2 or words[0] not in ("USER", "PASS", "NOTFOUND", "FAIL"):
        raise ProtocolError(f"not a lookup reply: {words[0][:40]!r}")
    if words[1] != str(request_id):
        raise ProtocolError(f"reply for request {words[1][:20]!r}, we asked {request_id}")
    if words[0] == "NOTFOUND":
        return LookupReply(False)
    if words[0] == "FAIL":
        return LookupReply(False, True, fields=_fields(words[2:]))
    if words[0] == "PASS":  # PASS id fields (the name is the user= field)
        fields = _fields(words[2:])
        return LookupReply(True, user=fields.get("user", ""), fields=fields)
    return LookupReply(True, user=words[2] if len(words) > 2 else "", fields=_fields(words[3:]))
