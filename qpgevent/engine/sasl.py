"""SASL exchanges of SMTP AUTH (RFC 4954): the mechanisms' wire formats, step by step, sans I/O.

An *exchange* is one AUTH attempt's small state machine: ``start(initial)`` and
``step(response)`` each return a ``Challenge`` (send ``334`` with this text and read one
more line) or ``Credentials`` (ask the back ends), or raise ``BadResponse``. PLAIN
(RFC 4616), LOGIN and CRAM-MD5 (RFC 2195) are built in. A plugin adds a mechanism by
declaring it (``sasl_mechanisms = ("X-TOKEN",)``): its exchange starts with one response
(the initial response, or the answer to an empty 334), handed whole to the ``auth_sasl``
hook, which may challenge again (``PluginExchange`` counts the steps, the engine's
``authentication`` asks the plugin).

``mechanisms`` says which built-in mechanisms the loaded plugins can check, in a fixed
order (qpsmtpd listed them in Perl hash order, random; and offered CRAM-MD5 for any
generic ``auth`` plugin, even one that keeps only hashes and so can never check it).
Secrets (passwords, PLAIN blobs, CRAM digests) are never logged here.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Mechanism -> its hook; the generic "auth" hook can do the ones that send the password.
MECHANISM_HOOKS = {"PLAIN": "auth_plain", "LOGIN": "auth_login", "CRAM-MD5": "auth_cram_md5"}
GENERIC_MECHANISMS = ("PLAIN", "LOGIN")
MAX_STEPS = 10  #: a plugin's challenges in one exchange (SCRAM needs 2): past it, 535
USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()


def mechanisms(has_hook: Callable[[str], bool]) -> tuple[str, ...]:
    """The mechanisms to offer, given ``has_hook(name) -> bool`` (the hook runner's ``has``)."""
    generic = has_hook("auth")
    return tuple(mech for mech, hook in MECHANISM_HOOKS.items()
                 if has_hook(hook) or (generic and mech in GENERIC_MECHANISMS))


class BadResponse(ValueError):
    """The client's SASL response does not follow the mechanism's format."""


def parse_plain(blob: bytes) -> tuple[str, str]:
    """RFC 4616: authzid NUL authcid NUL passwd -> (user, password).

    An authzid other than empty or the user itself (acting for someone else) is refused:
    no backend here grants that right.
    """
    parts = blob.split(b"\0")
    if len(parts) != 3:
        raise BadResponse("PLAIN response is not authzid NUL authcid NUL password")
    authzid, user, password = (_text(part) for part in parts)
    if not user or not password:
        raise BadResponse("empty user or password")
    if authzid and authzid != user:
        raise BadResponse("authorization identity differs from the user")
    return user, password


def parse_login(blob: bytes) -> str:
    """One LOGIN answer (user name or password): UTF-8, not empty."""
    text = _text(blob)
    if not text:
        raise BadResponse("empty LOGIN response")
    return text


def challenge(me: str) -> str:
    """A CRAM-MD5 challenge, RFC 2195 style: ``<random.timestamp@host>``, never reused."""
    return f"<{secrets.randbelow(1 << 62)}.{int(time.time())}@{me}>"


def parse_cram(blob: bytes) -> tuple[str, str]:
    """RFC 2195: ``user SP hex-digest`` -> (user, digest)."""
    user, _, digest = _text(blob).rpartition(" ")
    digest = digest.lower()
    if not user or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise BadResponse("CRAM-MD5 response is not 'user digest'")
    return user, digest


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadResponse("not UTF-8") from None


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 text`` (already base64) and read the client's next line."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the client proved it knows, for the back ends; never logged but ``user``."""

    mechanism: str
    user: str | None
    password: str | None = None
    ticket: str | None = None  #: CRAM-MD5's challenge
    response: bytes | None = None  #: a plugin mechanism's whole response


class Exchange:
    """One AUTH attempt with one mechanism (a subclass per mechanism)."""

    def __init__(self, mechanism: str, me: str) -> None:
        self.mechanism, self.me = mechanism, me
        self.user: str | None = None  #: once the client has said who it is

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        return Challenge("") if initial is None else self.step(initial)

    def step(self, data: bytes) -> Challenge | Credentials:
        return Credentials(self.mechanism, None, response=data)  # a plugin's mechanism: one response


class PluginExchange(Exchange):
    """A plugin's mechanism: the steps so far, and the plugin that challenged (asked alone next)."""

    def __init__(self, mechanism: str, me: str) -> None:
        super().__init__(mechanism, me)
        self.steps = 0  #: challenges sent so far
        self.owner: str | None = None


class Plain(Exchange):
    def step(self, data: bytes) -> Challenge | Credentials:
        self.user, password = parse_plain(data)
        return Credentials(self.mechanism, self.user, password)


class Login(Exchange):
    def start(self, initial: bytes | None) -> Challenge | Credentials:
        return Challenge(USERNAME_PROMPT) if initial is None else self.step(initial)

    def step(self, data: bytes) -> Challenge | Credentials:
        if self.user is None:
            self.user = parse_login(data)
            return Challenge(PASSWORD_PROMPT)
        return Credentials(self.mechanism, self.user, parse_login(data))


class CramMd5(Exchange):
    """The server speaks first (RFC 4954 4: no initial response)."""

    ticket = ""

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        if initial is not None:
            raise BadResponse("CRAM-MD5 takes no initial response")
        self.ticket = challenge(self.me)
        return Challenge(base64.b64encode(self.ticket.encode()).decode())

    def step(self, data: bytes) -> Challenge | Credentials:
        self.user, digest = parse_cram(data)
        return Credentials(self.mechanism, self.user, digest, self.ticket)


EXCHANGES: dict[str, type[Exchange]] = {"PLAIN": Plain, "LOGIN": Login, "CRAM-MD5": CramMd5}
