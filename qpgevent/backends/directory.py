"""What directory plugins share (Dovecot, LDAP): the ``on_failure`` option, and a TTL cache.

A directory that refuses the connection, does not answer within ``lookup_timeout``
seconds, or answers something its protocol does not allow is *unavailable*
(``Unavailable``), and the plugin's ``on_failure`` option decides what the client gets:

  tempfail  (default) try again later: 454 4.7.0 for AUTH, 451 4.4.3 for a recipient
  accept    as if the directory had said yes (the user authenticated, the recipient
            exists): keeps mail flowing, at the price of what the check was for
  reject    as if it had said no: 535 5.7.8 for AUTH, 550 5.4.3 for a recipient

Every fallback is logged with the reason. Keep ``lookup_timeout`` below the plugin's
``timeout`` (the hook runner's limit, which answers a generic 451) so that the
configured mode decides.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from ..plugin import DENY, DENYSOFT, OK
from .scanner import ScannerError

__all__ = ["NO_SUCH_USER", "CONFIGSPEC", "CACHE_CONFIGSPEC", "Unavailable", "fallback", "TtlCache"]

CONFIGSPEC = [
    'on_failure = option("tempfail", "accept", "reject", default="tempfail")',
    "lookup_timeout = float(min=0.01, default=5)",
]
CACHE_CONFIGSPEC = [
    "cache_ttl = float(min=0, default=300)",
    "negative_ttl = float(min=0, default=60)",
    "cache_size = integer(min=0, default=10000)",
]

#: The refusal of a recipient the directory does not know (RFC 3463 X.1.1: bad mailbox).
NO_SUCH_USER = "5.1.1 {address}: no such user here"

#: The directory cannot answer now. The same failure as a scanner's (refused, timed
#: out, broken reply), so the one connect/deadline helper serves both.
Unavailable = ScannerError


#: on_failure -> the verdict, per hook: AUTH (RFC 4954 6: 454 4.7.0 is "try later") and
#: RCPT (RFC 3463 X.4.3: directory server failure).
FALLBACKS = {
    "auth": {"accept": OK, "reject": DENY, "tempfail": DENYSOFT},
    "rcpt": {"accept": OK,
             "reject": (DENY, "550 5.4.3 Recipient cannot be verified (directory failure)"),
             "tempfail": (DENYSOFT, "451 4.4.3 Recipient cannot be verified now, try again later")},
}


def fallback(plugin: Any, hook: str, service: str, error: Exception) -> Any:
    """The ``hook``'s verdict when ``service`` could not answer, as ``on_failure`` says; logged."""
    mode = plugin.config["on_failure"]
    plugin.log.warning("%s unavailable (on_failure = %s): %s", service, mode, error)
    return FALLBACKS[hook][mode]


class TtlCache:
    """Answers kept ``ttl`` seconds (``negative_ttl`` for "no such entry", stored as None).

    At most ``size`` entries: the oldest goes first. One per plugin instance, shared by
    the worker's sessions (they run in one thread, between greenlet switches).
    """

    def __init__(self, ttl: float, negative_ttl: float, size: int) -> None:
        self.ttl, self.negative_ttl, self.size = ttl, negative_ttl, size
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TtlCache:
        return cls(config["cache_ttl"], config["negative_ttl"], config["cache_size"])

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, value) if a fresh answer is kept, else (False, None)."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return False, None
        return True, entry[1]

    def fetch(self, key: str, lookup: Any) -> Any:
        """The kept answer for ``key``, or ``lookup(key)`` kept (``Unavailable`` is not kept)."""
        hit, value = self.get(key)
        if not hit:
            value = lookup(key)
            self.put(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        ttl = self.ttl if value is not None else self.negative_ttl
        if ttl <= 0 or self.size <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (time.monotonic() + ttl, value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
