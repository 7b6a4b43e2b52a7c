"""auth/flat_file: check AUTH PLAIN and LOGIN passwords against a users file of scrypt hashes.

The file holds one user a line, ``user:hash`` (``#`` comments and blank lines are
skipped), and is read again when it changes. Passwords are never stored: each hash is
``scrypt$N$r$p$salt$digest`` (salt and digest in base64), a salted, memory-hard slow hash
(RFC 7914, ``hashlib.scrypt``). Make or change an entry with ``tools/qpgevent-adduser``.

Checking a password costs tens of milliseconds of CPU on purpose; it runs in the worker's
thread pool so other sessions keep going. An unknown user costs the same as a wrong
password (no user enumeration by timing). Unknown user: DECLINED (a later auth plugin may
know them); wrong password: DENY. Either way the client gets 535 5.7.8.

CRAM-MD5 is not offered through this plugin: it needs the plaintext secret on the server,
and this file only keeps salted slow hashes, on purpose. The plugin hooks the generic
``auth`` hook, which offers PLAIN and LOGIN (only over TLS unless [auth] says otherwise).

Options:
  users   the users file (required), relative to qpsmtpd.ini's folder

Example::

    [[auth/flat_file]]
      users = users.auth
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from typing import Any

from qpgevent.plugin import DECLINED, DENY, OK, Plugin, run_blocking

#: scrypt cost: N=2**14, r=8, p=1 is ~16 MiB and ~50 ms (RFC 7914 / OWASP's floor).
DEFAULT_COST = (1 << 14, 8, 1)


def make_hash(password: str, cost: tuple[int, int, int] = DEFAULT_COST) -> str:
    """A new ``scrypt$N$r$p$salt$digest`` for ``password`` (fresh 16-octet salt)."""
    n, r, p = cost
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 << 20, dklen=32)
    return "$".join(("scrypt", str(n), str(r), str(p), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()))


def check_hash(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored``; False for a malformed entry, and for an
    empty password whatever is stored (the SASL parsers refuse one too: two locks)."""
    if not password:
        return False
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                             p=int(p), maxmem=256 << 20, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


_DUMMY = make_hash(secrets.token_hex(8))  # what an unknown user is checked against


class FlatFile(Plugin):
    configspec = "users = path()"

    def setup(self) -> None:
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._load()

    def hook_auth(self, session: Any, mechanism: str, user: str, password: str, ticket: Any) -> Any:
        if ticket is not None:
            return DECLINED  # CRAM-MD5: we cannot (see above)
        stored = self._load().get(user.lower())
        matched = run_blocking(check_hash, password, stored or _DUMMY)
        # The same words for both failures (535 5.7.8): the reply must not tell which users exist.
        if stored is None:
            self.log.info("unknown user %s", user)
            return DECLINED
        if not matched:
            self.log.info("wrong password for %s", user)
            return DENY
        return OK

    def _load(self) -> dict[str, str]:
        path = self.config["users"]
        try:
            st = os.stat(path)
        except OSError as error:
            self.log.error("users file %s: %s", path, error.strerror)
            return self._users
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            users = {}
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    name, sep, stored = line.rpartition(":")
                    if not sep or not stored.startswith("scrypt$"):
                        self.log.error("%s:%d: not user:scrypt$... (skipped)", path, number)
                        continue
                    users[name.lower()] = stored
            self._users, self._stamp = users, stamp
        return self._users
