"""The embedded store: one SQLite file shared by every worker process of a host.

Zero set-up: the file (with its ``-wal`` and ``-shm`` companions) is created on first
use. Safe for many processes at once: WAL mode (readers never wait for the writer),
``synchronous = NORMAL`` (a crash loses at most the last moments, never consistency;
this is policy state, not mail), a busy timeout, and every read-modify-write inside
``BEGIN IMMEDIATE``, so two workers never interleave one. Time is this host's clock.

SQLite calls are blocking C calls: one that waits on another worker's lock would stop
the whole hub. So every call runs on a thread of its own (one per process, owning the
connection): the hub keeps serving while it waits. The hand-off costs tens of
microseconds (``tools/bench_policy.py`` measures it end to end).

Opening is retried for up to ``timeout`` seconds: ``PRAGMA journal_mode = WAL`` on a new
file that another process has locked (it is creating the file too) fails at once with
"database is locked", whatever the busy timeout. The file is created 0600 (SQLite gives
its ``-wal`` and ``-shm`` files the same mode): it holds the user names AUTH was tried
with. An existing file readable by others loses that permission.

Leases are rows with the holder's pid and an expiry the heartbeat renews. A holder
that died is seen at once when the key is full (its pid is gone); otherwise its rows
lapse at their expiry like every other backend's.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from typing import Any, Callable

import gevent.monkey
from gevent.threadpool import ThreadPool

from .store_base import Entry, Lease, Store, StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (key TEXT NOT NULL, at REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_key ON events (key, at);
CREATE INDEX IF NOT EXISTS events_expires ON events (expires);
CREATE TABLE IF NOT EXISTS leases (token TEXT PRIMARY KEY, key TEXT NOT NULL, pid INTEGER NOT NULL,
                                   expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_key ON leases (key, expires);
"""
#: The store's own thread waits with the real sleep (it is not a greenlet of the hub).
_sleep = gevent.monkey.get_original("time", "sleep")
#: Seconds between sweeps of lapsed rows (each process sweeps on its own calls).
PURGE_EVERY = 60.0


def _create_private(path: str) -> None:
    """Create ``path`` 0600 if it is not there; take others' access away if it is."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o007:
            os.fchmod(fd, stat.S_IMODE(mode) & ~0o007)
    finally:
        os.close(fd)


class EmbeddedStore(Store):
    backend = "embedded"

    def __init__(self, path: str, *, timeout: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        self.path = path
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPool | None = None
        self._purged = 0.0
        self._orphans: list[Any] = []  # a parent's objects, kept (never closed) after fork

    # -- plumbing ------------------------------------------------------------
    def _execute(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._pool is None:
            self._pool = ThreadPool(1)
        failed, value = self._pool.apply(self._in_thread, (function, args))
        if failed:  # raised here, not in the pool's thread: gevent would print a traceback there
            if isinstance(value, (sqlite3.Error, OSError)):
                raise StoreUnavailable(f"{self.path}: {value}") from None
            raise value
        return value

    def _in_thread(self, function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
        try:
            if self._db is None:
                self._db = self._open()
            now = time.time()
            if now - self._purged > PURGE_EVERY:
                self._purged = now
                self._purge(now)
            return False, function(*args)
        except Exception as error:
            return True, error

    def _open(self) -> sqlite3.Connection:
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        _create_private(self.path)
        deadline, pause = time.monotonic() + self.timeout, 0.005
        while True:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.executescript(SCHEMA)
                return db
            except sqlite3.OperationalError as error:
                db.close()
                locked = "locked" in str(error) or "busy" in str(error)
                if not locked or time.monotonic() + pause > deadline:
                    raise
            except sqlite3.Error:
                db.close()
                raise
            _sleep(pause)
            pause = min(pause * 2, 0.1)

    def _purge(self, now: float) -> None:
        with _immediate(self._db) as db:
            db.execute("DELETE FROM kv WHERE expires <= ?", (now,))
            db.execute("DELETE FROM events WHERE expires <= ?", (now,))
            db.execute("DELETE FROM leases WHERE expires <= ?", (now,))

    def _after_fork(self) -> None:
        # The parent's connection and thread pool are unusable here, and closing the
        # connection could disturb the parent's locks: keep them, untouched.
        self._orphans += [self._db, self._pool]
        self._db, self._pool, self._purged = None, None, 0.0

    def _do_close(self) -> None:
        if self._pool is not None:
            if self._db is not None:
                self._pool.apply(self._db.close)
            self._pool.kill()
        self._db, self._pool = None, None

    # -- operations (on the store's thread) ------------------------------------
    def _do_get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return row[0]

    def _do_set(self, key: str, value: str, ttl: float | None) -> None:
        expires = time.time() + ttl if ttl else None
        self._db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)", (key, value, expires))

    def _do_delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def _do_incr(self, key: str, amount: int, ttl: float | None) -> int:
        now = time.time()
        with _immediate(self._db) as db:
            row = db.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
            alive = row is not None and (row[1] is None or row[1] > now)
            value = (int(row[0]) if alive else 0) + amount
            expires = now + ttl if ttl else (row[1] if alive else None)
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)", (key, str(value), expires))
        return value

    def _do_hit(self, key: str, limit: int, window: float) -> int:
        now = time.time()
        with _immediate(self._db) as db:
            db.execute("DELETE FROM events WHERE key = ? AND at <= ?", (key, now - window))
            (count,) = db.execute("SELECT COUNT(*) FROM events WHERE key = ?", (key,)).fetchone()
            if count < limit:
                db.execute("INSERT INTO events (key, at, expires) VALUES (?, ?, ?)", (key, now, now + window))
        return count + 1

    def _do_count(self, key: str, window: float) -> int:
        return self._db.execute("SELECT COUNT(*) FROM events WHERE key = ? AND at > ?",
                                (key, time.time() - window)).fetchone()[0]

    def _do_acquire(self, lease: Lease, limit: int) -> bool:
        now = time.time()
        with _immediate(self._db) as db:
            db.execute("DELETE FROM leases WHERE key = ? AND expires <= ?", (lease.key, now))
            (count,) = db.execute("SELECT COUNT(*) FROM leases WHERE key = ?", (lease.key,)).fetchone()
            if count >= limit:
                # Full: free the slots of holders that died (same host, so their pid tells).
                rows = db.execute("SELECT token, pid FROM leases WHERE key = ?", (lease.key,)).fetchall()
                dead = [(token,) for token, pid in rows if not _alive(pid)]
                db.executemany("DELETE FROM leases WHERE token = ?", dead)
                count -= len(dead)
            if count >= limit:
                return False
            db.execute("INSERT INTO leases (token, key, pid, expires) VALUES (?, ?, ?, ?)",
                       (lease.token, lease.key, os.getpid(), now + lease.ttl))
        return True

    def _do_refresh(self, leases: list[Lease]) -> None:
        now = time.time()
        with _immediate(self._db) as db:
            db.executemany("UPDATE leases SET expires = ? WHERE token = ?",
                           [(now + lease.ttl, lease.token) for lease in leases])

    def _do_release(self, lease: Lease) -> None:
        self._db.execute("DELETE FROM leases WHERE token = ?", (lease.token,))

    def _do_holders(self, key: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM leases WHERE key = ? AND expires > ?",
                                (key, time.time())).fetchone()[0]

    # -- for the operator --------------------------------------------------------
    def _do_entries(self, prefix: str, limit: int, exact: bool) -> list[Entry]:
        now = time.time()
        # substr, not LIKE: keys hold '%' and '_' freely (greylisting's triplets).
        match = "key = ?" if exact else "substr(key, 1, ?) = ?"
        args: tuple[Any, ...] = (prefix,) if exact else (len(prefix), prefix)
        found = [Entry(key, "value", value, 1, expires) for key, value, expires in self._db.execute(
            f"SELECT key, value, expires FROM kv WHERE {match} AND (expires IS NULL OR expires > ?) "
            "ORDER BY key LIMIT ?", (*args, now, limit))]
        for table, kind in (("events", "events"), ("leases", "leases")):
            found += [Entry(key, kind, None, count, expires) for key, count, expires in self._db.execute(
                f"SELECT key, COUNT(*), MAX(expires) FROM {table} WHERE {match} AND expires > ? "
                "GROUP BY key ORDER BY key LIMIT ?", (*args, now, limit))]
        return found

    def _do_forget(self, key: str) -> int:
        now = time.time()
        gone = 0
        with _immediate(self._db) as db:
            for table in ("kv", "events", "leases"):
                live = db.execute(f"SELECT COUNT(*) FROM {table} WHERE key = ? AND "
                                  f"{'(expires IS NULL OR expires > ?)' if table == 'kv' else 'expires > ?'}",
                                  (key, now)).fetchone()[0]
                gone += 1 if live else 0
                db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))
        return gone


class _immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one writer at a time."""

    def __init__(self, db: sqlite3.Connection | None) -> None:
        assert db is not None
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error:
                self.db.execute("ROLLBACK")  # never leave the connection inside a transaction
                raise
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


__all__ = ["EmbeddedStore"]
