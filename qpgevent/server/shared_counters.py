"""Concurrent-session counts that hold for the whole host: the global and per-address limits.

Theory of operation. Every open session holds a *lease*: one 16-octet slot naming its
client address. Each worker process owns one *row* of slots in a table shared by all
workers (a small file, mapped with ``MAP_SHARED`` by the master before it forks, so every
worker sees the same memory). A worker only ever writes its own row; it keeps the row
packed (slots ``0 .. used-1``), so reading the table costs the sessions open, not its
capacity. "How many sessions from 192.0.2.7, on every worker?" is a scan of the used
slots of every row; "how many in all?" is the sum of the row headers.

The third field of a row's header is its worker's *heartbeat*: the ``time.monotonic()``
(one clock for every process of the host) at which the worker's event loop last ran a
small greenlet (``qpgevent.watchdog``). The master reads it to notice a worker whose
loop is blocked. Only the worker writes it, one aligned 8-octet store, without the lock.
The fourth is its *stress flag*: 1 while the worker finds the host in stress
(``qpgevent.server.shedding``), so that the others follow it in.

Leases free themselves when their holder dies: the master clears a worker's row when it
reaps that worker, whatever killed it, so a ``kill -9`` cannot leak counts.

Check-and-increment must be atomic across processes, or two workers could each see 999
sessions and both take the 1000th place. An ``fcntl.lockf`` lock on the table's file
guards every read and write. It is held for microseconds and never across a greenlet
switch (nothing in between yields), so holding it blocks neither our other greenlets nor,
for long, the other workers; and the kernel drops it if its holder dies. A session whose
address is known when it is accepted (no PROXY header to read first) names it in the
same locked step as it takes its place: two lock round trips per session, not three, and
no other system call (a lease changes only its row's count of used slots, not the owner's
pid: asking ``getpid`` for it cost two calls per session).

``count`` takes an address or a network (``2001:db8:1:2::/64``): a client with a whole
IPv6 /64 (the usual end-site assignment) has 2**64 addresses to spread its sessions over,
so a per-address limit counts its /64 (``plugins/hosts_allow``). A network is matched on
the slots' leading octets, with the same ``find`` as one address.

``LocalCounters`` is the same interface for a single process (the in-process server of
the tests), without the file.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import hashlib
import ipaddress
import mmap
import os
import struct
import tempfile
from typing import Protocol

SLOT = 16  #: one client address: IPv6, or IPv4 mapped into IPv6 (::ffff:a.b.c.d)
# Owner pid, used slots, heartbeat, stress flag (padded to 32 octets: slots stay 16-aligned).
_HEADER = struct.Struct("=IIdI12x")
_STRESS = struct.Struct("=I")
_STRESS_AT = 16  # its offset in the header
_OWNER = struct.Struct("=II")  # the part of the header the master and a new worker set
_USED = struct.Struct("=I")  # the part the leases change
_USED_AT = 4  # its offset in the header, after the owner's pid
FREE = bytes(SLOT)  # "::": never a TCP peer
PENDING = b"\xff" * SLOT  # a session whose address is not known yet (PROXY header coming)
#: Sessions one worker can hold; the table is a sparse file, so unused room costs nothing.
DEFAULT_CAPACITY = 65536


@functools.lru_cache(maxsize=4096)  # a few microseconds per session otherwise; clients come back
def address_key(ip: str) -> bytes:
    """The 16 octets that stand for ``ip`` in the table (192.0.2.1 is ::ffff:192.0.2.1)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:  # not an IP address (a Unix socket?): any stable 16 octets will do
        return hashlib.blake2b(ip.encode(), digest_size=SLOT).digest()
    if isinstance(address, ipaddress.IPv4Address):
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    key = address.packed
    return key if key not in (FREE, PENDING) else PENDING


@functools.lru_cache(maxsize=4096)
def network_key(text: str) -> tuple[bytes, int] | None:
    """``(leading octets, mask of the octet after them)`` for a network ``text``
    (``2001:db8::/64``, ``192.0.2.0/24``: IPv4 as mapped into IPv6); None for an address."""
    if "/" not in text:
        return None
    network = ipaddress.ip_network(text, strict=False)
    bits = network.prefixlen + (96 if network.version == 4 else 0)
    key = address_key(str(network.network_address))
    whole, rest = divmod(bits, 8)
    return key[:whole + (1 if rest else 0)], (0xFF << (8 - rest)) & 0xFF if rest else 0xFF


def _in_network(slot: bytes, prefix: bytes, last_mask: int) -> bool:
    head = len(prefix) - 1
    return (slot[:head] == prefix[:head] and slot[head] & last_mask == prefix[head] & last_mask
            if prefix else True)


class Lease(Protocol):
    def set_ip(self, ip: str) -> None: ...
    def release(self) -> None: ...


class Counters(Protocol):
    """What the server needs: take a place under a limit, count sessions from an address."""

    def acquire(self, limit: int, ip: str | None = None) -> Lease | None: ...
    def count(self, ip: str) -> int: ...
    def sessions(self) -> int: ...
    def set_stressed(self, stressed: bool) -> None: ...
    def stressed_elsewhere(self) -> bool: ...


# -- one process --------------------------------------------------------------------


class LocalLease:
    __slots__ = ("_counters", "_key", "_released")  # one per session, as SharedLease

    def __init__(self, counters: LocalCounters, key: bytes) -> None:
        self._counters, self._key, self._released = counters, key, False

    def set_ip(self, ip: str) -> None:
        self._counters._move(self._key, address_key(ip))
        self._key = address_key(ip)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._counters._move(self._key, None)


class LocalCounters:
    """Counts for one process: ``SmtpServer`` used on its own (tests, embedding)."""

    def __init__(self) -> None:
        self._by_key: collections.Counter[bytes] = collections.Counter()
        self.total = 0

    def acquire(self, limit: int, ip: str | None = None) -> LocalLease | None:
        """A place under ``limit``, counted for ``ip`` (None: not known yet, see ``set_ip``)."""
        if self.total >= limit:
            return None
        key = PENDING if ip is None else address_key(ip)
        self.total += 1
        self._by_key[key] += 1
        return LocalLease(self, key)

    def count(self, ip: str) -> int:
        """Sessions from the address ``ip``, or from the network ``ip`` (``2001:db8::/64``)."""
        network = network_key(ip)
        if network is None:
            return self._by_key[address_key(ip)]
        return sum(n for key, n in self._by_key.items() if key != PENDING and _in_network(key, *network))

    def sessions(self) -> int:
        """Sessions open, in all."""
        return self.total

    def set_stressed(self, stressed: bool) -> None:
        pass  # one process: nobody to tell

    def stressed_elsewhere(self) -> bool:
        return False

    def _move(self, old: bytes, new: bytes | None) -> None:
        self._by_key[old] -= 1
        if self._by_key[old] <= 0:
            del self._by_key[old]
        if new is None:
            self.total -= 1
        else:
            self._by_key[new] += 1


# -- every worker of the host --------------------------------------------------------


class SharedTable:
    """The table itself: created by the master before forking, inherited by every worker."""

    def __init__(self, rows: int, capacity: int = DEFAULT_CAPACITY) -> None:
        self.rows, self.capacity = rows, capacity
        self.row_size = _HEADER.size + capacity * SLOT
        # An unlinked temporary file: nothing to clean up, even after kill -9. Sparse, so
        # only the pages of slots ever used take memory.
        self._file = tempfile.TemporaryFile(prefix="qpgevent-counters-")
        os.ftruncate(self._file.fileno(), rows * self.row_size)
        self.map = mmap.mmap(self._file.fileno(), rows * self.row_size, mmap.MAP_SHARED)
        self._lock = _FileLock(self._file.fileno())

    def locked(self) -> _FileLock:
        """``with table.locked():`` holds the lock on the table, across processes."""
        return self._lock

    def header(self, row: int) -> tuple[int, int]:
        pid, used = _OWNER.unpack_from(self.map, row * self.row_size)
        return pid, used

    def set_header(self, row: int, pid: int, used: int) -> None:
        _OWNER.pack_into(self.map, row * self.row_size, pid, used)

    def set_used(self, row: int, used: int) -> None:
        """The slots of ``row`` in use (its owner's pid is written once, when it starts)."""
        _USED.pack_into(self.map, row * self.row_size + _USED_AT, used)

    def beat(self, row: int, now: float) -> None:
        """The worker of ``row``: my event loop ran at ``now`` (``time.monotonic()``)."""
        struct.pack_into("=d", self.map, row * self.row_size + _OWNER.size, now)

    def heartbeat(self, row: int) -> float:
        """When the worker of ``row`` last beat (0.0: never)."""
        return _HEADER.unpack_from(self.map, row * self.row_size)[2]

    def set_stressed(self, row: int, stressed: bool) -> None:
        _STRESS.pack_into(self.map, row * self.row_size + _STRESS_AT, int(stressed))

    def stressed(self, row: int) -> bool:
        return bool(_HEADER.unpack_from(self.map, row * self.row_size)[3])

    def slot_offset(self, row: int, index: int) -> int:
        return row * self.row_size + _HEADER.size + index * SLOT

    def total(self) -> int:
        """Sessions open on every worker (call with the lock held)."""
        return sum(self.header(row)[1] for row in range(self.rows))

    def count(self, key: bytes, last_mask: int = 0xFF) -> int:
        """Sessions from the address ``key``, or whose address starts with the octets
        ``key`` (the last one under ``last_mask``), on every worker (call with the lock held)."""
        found = 0
        exact = last_mask == 0xFF
        search = key if exact else key[:-1]
        for row in range(self.rows):
            used = self.header(row)[1]
            if not used:
                continue
            start = self.slot_offset(row, 0)
            region = self.map[start:start + used * SLOT]
            if not search:  # a prefix shorter than one octet: look at every slot
                slots = (region[i:i + SLOT] for i in range(0, len(region), SLOT))
                found += sum(slot != PENDING and _in_network(slot, key, last_mask) for slot in slots)
                continue
            at = region.find(search)
            while at >= 0:
                if at % SLOT == 0 and (exact or region[at + len(search)] & last_mask == key[-1] & last_mask):
                    found += region[at:at + SLOT] != PENDING  # a match across two slots is not an address
                at = region.find(search, at + 1)
        return found

    # -- the master's side ----------------------------------------------------------
    def claim_row(self) -> int | None:
        """A free row for a worker about to be forked, or None when every row is taken.

        The row is marked with the master's pid until the worker writes its own.
        """
        with self.locked():
            for row in range(self.rows):
                if self.header(row)[0] == 0:
                    self.set_header(row, os.getpid(), 0)
                    return row
        return None

    def free_rows(self) -> int:
        with self.locked():
            return sum(1 for row in range(self.rows) if self.header(row)[0] == 0)

    def clear_row(self, row: int) -> int:
        """The worker of ``row`` is gone: its leases are void. Returns how many there were."""
        with self.locked():
            _, used = self.header(row)
            self.set_header(row, 0, 0)
            self.beat(row, 0.0)  # the next worker of this row has not beaten yet
            self.set_stressed(row, False)
        return used

    def sessions(self) -> int:
        with self.locked():
            return self.total()

    def close(self) -> None:
        self.map.close()
        self._file.close()


class _FileLock:
    """An ``fcntl.lockf`` lock on a file, as a ``with`` block (a class: this is taken twice
    per session, and a generator-based context manager costs more than the lock)."""

    __slots__ = ("fileno",)

    def __init__(self, fileno: int) -> None:
        self.fileno = fileno

    def __enter__(self) -> None:
        fcntl.lockf(self.fileno, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.lockf(self.fileno, fcntl.LOCK_UN)


class SharedLease:
    __slots__ = ("_counters", "index")

    def __init__(self, counters: WorkerCounters, index: int) -> None:
        self._counters, self.index = counters, index

    def set_ip(self, ip: str) -> None:
        self._counters._write(self, address_key(ip))

    def release(self) -> None:
        self._counters._release(self)


class WorkerCounters:
    """One worker's view of the shared table: it writes only its own ``row``."""

    def __init__(self, table: SharedTable, row: int) -> None:
        self.table, self.row = table, row
        self._leases: list[SharedLease] = []  # slot i of our row belongs to _leases[i]
        with table.locked():
            table.set_header(row, os.getpid(), 0)

    def acquire(self, limit: int, ip: str | None = None) -> SharedLease | None:
        """A place under ``limit`` on the whole host, counted for ``ip`` (None: not known
        yet, see ``set_ip``); None when there is none."""
        table = self.table
        key = PENDING if ip is None else address_key(ip)  # before the lock: it may take microseconds
        with table.locked():
            if table.total() >= limit or len(self._leases) >= table.capacity:
                return None
            lease = SharedLease(self, len(self._leases))
            offset = table.slot_offset(self.row, lease.index)
            table.map[offset:offset + SLOT] = key
            self._leases.append(lease)
            table.set_used(self.row, len(self._leases))
        return lease

    def count(self, ip: str) -> int:
        """Sessions from the address ``ip``, or from the network ``ip`` (``2001:db8::/64``)."""
        network = network_key(ip)
        with self.table.locked():
            return self.table.count(address_key(ip)) if network is None else self.table.count(*network)

    def sessions(self) -> int:
        """Sessions open on every worker of the host."""
        return self.table.sessions()

    def set_stressed(self, stressed: bool) -> None:
        """Tell the other workers whether this one is in stress (one aligned store: no lock)."""
        self.table.set_stressed(self.row, stressed)

    def stressed_elsewhere(self) -> bool:
        """Whether another worker is in stress."""
        return any(self.table.stressed(row) for row in range(self.table.rows) if row != self.row)

    def _write(self, lease: SharedLease, key: bytes) -> None:
        if lease.index < 0:
            return
        offset = self.table.slot_offset(self.row, lease.index)
        with self.table.locked():
            self.table.map[offset:offset + SLOT] = key

    def _release(self, lease: SharedLease) -> None:
        if lease.index < 0:
            return  # released already
        table, last = self.table, len(self._leases) - 1
        with table.locked():
            if lease.index != last:  # keep the row packed: the last slot fills the hole
                moved = self._leases[last]
                source, target = table.slot_offset(self.row, last), table.slot_offset(self.row, lease.index)
                table.map[target:target + SLOT] = table.map[source:source + SLOT]
                moved.index = lease.index
                self._leases[lease.index] = moved
            self._leases.pop()
            table.set_used(self.row, len(self._leases))
        lease.index = -1
