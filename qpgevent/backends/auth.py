"""SMTP AUTH (RFC 4954) pieces that need the shared store or files: failure limits, senders.

The conversation drives the exchange and owns the mechanisms' wire formats
(``qpgevent.engine.sasl``); the server hands it these:

- ``FailureLimiter``: failed attempts per client address and per user, in sliding
  windows of the shared store, so every worker (and every host on Redis) sees them.
- ``SenderMap``: which envelope senders an authenticated user may use (submission).

Secrets (passwords, PLAIN blobs, CRAM digests) are never logged here.
"""

from __future__ import annotations

import logging
import os

from . import store
from ..core.address import Address

log = logging.getLogger("qpgevent.auth")


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
            return user is not None and bool(user) and \
                db.count(f"authfail:user:{user.lower()}", self.window) >= self.max_user
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
