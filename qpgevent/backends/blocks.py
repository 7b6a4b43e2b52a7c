"""Addresses the operator blocked for a while: kept in the shared store, checked at connect.

``qpgevent block 192.0.2.1 --for 1h`` (or the status page) writes the key
``block:<address or network>`` into ``[store]`` with that lifetime: the store forgets it
by itself when it lapses, and because the store is shared, the block holds in every
worker and, with Redis, on every host. Each block or release also bumps the counter
``blocks:version``.

The hot path (``BlockList.refusal``, once per connection, before any plugin) never waits
for the store: each process keeps the blocks in memory, with their expiry, and at most
once per ``CHECK_EVERY`` seconds a connection starts a look, in a greenlet of its own,
at ``blocks:version``; only when that number moved are the blocks read again. So a new
block or a release takes effect everywhere within about ``CHECK_EVERY`` seconds, and an
expiry at once (the expiry is kept with each block). When the store cannot be reached,
the blocks known so far stay in force (and lapse on time): a store outage neither blocks
nor frees anyone, nor slows a connection.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import gevent

from .store_base import Store, StoreUnavailable

log = logging.getLogger("qpgevent.blocks")

PREFIX = "block:"
VERSION_KEY = "blocks:version"
CHECK_EVERY = 1.0  #: seconds between two looks at ``blocks:version``, per process
MAX_BLOCKS = 10_000  #: blocks read into memory at most
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class Block:
    """One blocked address or network, until ``until`` (Unix time), and why."""

    network: str  #: "192.0.2.1" for one address, "192.0.2.0/24" for a network
    until: float
    reason: str = ""
    since: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d``, ``1w``: seconds. Raises ValueError."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (say 90s, 15m, 1h, 2d)")
    return float(found.group(1)) * _UNITS[found.group(2)]


def normalize(address: str) -> str:
    """The canonical text of an address or network (``192.0.2.0/24``; one address has no
    ``/32``). Raises ValueError for anything else."""
    try:
        network = ipaddress.ip_network(address.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP address or network: {address!r}") from None
    if network.num_addresses == 1:
        return str(network.network_address)
    return str(network)


def block(store: Store, address: str, seconds: float, reason: str = "") -> Block:
    """Block ``address`` (an address or a network) for ``seconds``. Raises ValueError, StoreUnavailable."""
    now = time.time()
    entry = Block(normalize(address), now + seconds, reason[:200], now)
    store.set(PREFIX + entry.network, json.dumps({"until": entry.until, "reason": entry.reason,
                                                  "since": entry.since}), ttl=seconds)
    store.incr(VERSION_KEY)
    return entry


def release(store: Store, address: str) -> bool:
    """Lift the block on ``address``; whether there was one."""
    gone = store.forget(PREFIX + normalize(address)) > 0
    store.incr(VERSION_KEY)
    return gone


def listing(store: Store) -> list[Block]:
    """Every live block, by address."""
    now, blocks = time.time(), []
    for entry in store.entries(PREFIX, MAX_BLOCKS):
        if entry.kind != "value" or entry.value is None:
            continue
        try:
            data = json.loads(entry.value)
            until = float(entry.expires if entry.expires is not None else data["until"])
            found = Block(entry.key[len(PREFIX):], until, str(data.get("reason", "")), float(data.get("since", 0)))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable block entry %s", entry.key)
            continue
        if found.until > now:
            blocks.append(found)
    return blocks


class BlockList:
    """This process's copy of the blocks, for the check at connect."""

    def __init__(self, store: Callable[[], Store], check_every: float = CHECK_EVERY) -> None:
        self.store = store  #: gives the store to read (the process's default one may be replaced)
        self.check_every = check_every
        self._version: int | None = None
        self._checked = 0.0
        self._addresses: dict[str, Block] = {}
        self._networks: list[tuple[Network, Block]] = []
        self._unreadable = False  #: the last look failed (logged once)
        self._looking: gevent.Greenlet | None = None

    def refusal(self, ip: str) -> Block | None:
        """The block that holds ``ip`` now, or None."""
        now = time.monotonic()
        if now - self._checked >= self.check_every and (self._looking is None or self._looking.dead):
            self._checked = now
            self._looking = gevent.spawn(self._refresh)
        if not self._addresses and not self._networks:
            return None
        wall = time.time()
        found = self._addresses.get(ip)
        if found is None and self._networks:
            address = ipaddress.ip_address(ip)
            found = next((b for network, b in self._networks if address in network), None)
        return found if found is not None and found.until > wall else None

    def _refresh(self) -> None:
        store = self.store()
        path = getattr(store, "path", None)
        if path is not None and not os.path.exists(path):
            # An embedded store nothing was ever written to holds no block; reading it would
            # make the file (a server without policy plugins never made one).
            self._version, self._addresses, self._networks = None, {}, []
            return
        try:
            version = int(store.get(VERSION_KEY) or 0)
            if version == self._version:
                return
            blocks = listing(store)
        except (StoreUnavailable, ValueError) as error:
            if not self._unreadable:  # once per outage, not every CHECK_EVERY seconds
                log.warning("cannot read the blocked addresses (the known ones stay): %s", error)
            self._unreadable = True
            return
        if self._unreadable:
            log.warning("the blocked addresses can be read again")
            self._unreadable = False
        self._version = version
        self._addresses = {b.network: b for b in blocks if "/" not in b.network}
        self._networks = [(ipaddress.ip_network(b.network), b) for b in blocks if "/" in b.network]
