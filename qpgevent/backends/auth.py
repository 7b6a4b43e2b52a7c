"""SMTP AUTH (RFC 4954) pieces the session uses: mechanisms, SASL decoding, limits, senders.

The session drives the exchange (the protocol core reads the 334 continuation lines);
this module holds what is not I/O:

- ``mechanisms``: which SASL mechanisms the loaded plugins can check, in a fixed order
  (qpsmtpd listed them in Perl hash order, random; and offered CRAM-MD5 for any generic
  ``auth`` plugin, even one that keeps only hashes and so can never check it).
- ``parse_plain`` / ``parse_cram`` and ``challenge``: the mechanisms' wire formats.
- ``FailureLimiter``: failed attempts per client address and per user, in sliding
  windows of the shared store, so every worker (and every host on Redis) sees them.
- ``SenderMap``: which envelope senders an authenticated user may use (submission).

Secrets (passwords, PLAIN blobs, CRAM digests) are never logged here.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import time
from typing import Any

from . import store
from ..core.address import Address

log = logging.getLogger("qpgevent.auth")

#: Mechanism -> its hook; the generic "auth" hook can do the ones that send the password.
MECHANISM_HOOKS = {"PLAIN": "auth_plain", "LOGIN": "auth_login", "CRAM-MD5": "auth_cram_md5"}
GENERIC_MECHANISMS = ("PLAIN", "LOGIN")
USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()


def mechanisms(has_hook: Any) -> tuple[str, ...]:
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


class FailureLimiter:
    """Failed AUTH attempts in sliding windows of the shared store, per address and per user.

    ``blocked`` says whether the address or the user is past its limit; ``failed``
    records one failure and returns how many this address has had in the window. When
    the store is down, limiting is skipped (logged): refusing every AUTH would lock out
    all users at once.
    """

    def __init__(self, max_ip: int, max_user: int, window: float) -> None:
        self.max_ip, self.max_user, self.window = max_ip, max_user, window

    def blocked(self, ip: str, user: str | None = None) -> bool:
        try:
            db = store.default()
            if db.count(f"authfail:ip:{ip}", self.window) >= self.max_ip:
                return True
            return bool(user) and db.count(f"authfail:user:{user.lower()}", self.window) >= self.max_user
        except store.StoreUnavailable as error:
            log.warning("store unavailable, AUTH failures not limited: %s", error)
            return False

    def failed(self, ip: str, user: str | None) -> int:
        try:
            db = store.default()
            if user:
                db.hit(f"authfail:user:{user.lower()}", self.max_user, self.window)
            return db.hit(f"authfail:ip:{ip}", self.max_ip, self.window)
        except store.StoreUnavailable as error:
            log.warning("store unavailable, AUTH failure not counted: %s", error)
            return 1


class SenderMap:
    """``[auth] senders``: user -> envelope senders (addresses, ``@domain``); reread on change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._map: dict[str, tuple[str, ...]] = {}

    def allows(self, user: str, sender: Address) -> bool:
        if sender.is_null:
            return True  # DSNs and MDNs (RFC 3461, RFC 8098) go out with the null sender
        address = sender.address.lower()
        domain = "@" + address.rpartition("@")[2]
        allowed = self._load().get(user.lower())
        if allowed is None:
            allowed = (user.lower(),) if "@" in user else ()
        return address in allowed or domain in allowed

    def _load(self) -> dict[str, tuple[str, ...]]:
        if not self.path:
            return {}
        try:
            st = os.stat(self.path)
        except OSError as error:
            log.error("[auth] senders %s: %s; only user-name senders allowed", self.path, error.strerror)
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            entries: dict[str, tuple[str, ...]] = {}
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    words = line.split("#", 1)[0].split()
                    if words:
                        entries[words[0].lower()] = tuple(word.lower() for word in words[1:])
            self._map, self._stamp = entries, stamp
        return self._map
