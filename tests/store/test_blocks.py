"""Blocked addresses in the shared store (``qpgevent.backends.blocks``), on both backends.

The real ``qpgevent block / release / blocks`` commands write the config's ``[store]``; a
``BlockList`` on a store object of its own (as a worker has) must see each change, match
addresses and networks, let a block lapse by itself, make no store call on the hot path,
and read no more than the version key while nothing changes. A look at the store runs
beside the connection that started it, so each change is awaited (``sees``).
"""

from __future__ import annotations

import json
import subprocess
import sys

from qpgevent.backends import blocks
from qpgevent.testing import wait_until
from store_helpers import make_store
from test_store_cli import store_ini


def qpgevent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def sees(blocklist: blocks.BlockList, ip: str, blocked: bool) -> blocks.Block | None:
    """Wait until ``blocklist`` says ``ip`` is (or is not) blocked; the block."""
    found = wait_until(lambda: (lambda b: (b,) if (b is not None) == blocked else None)(blocklist.refusal(ip)),
                       10, f"{ip} {'blocked' if blocked else 'free'}")
    return found[0]


def test_the_commands_block_and_release_for_every_reader(backend, request, tmp_path):
    ini = str(store_ini(tmp_path, backend, request))
    worker_store = make_store(backend, request, tmp_path)
    try:
        seen = blocks.BlockList(lambda: worker_store, check_every=0)
        assert seen.refusal("192.0.2.9") is None
        assert qpgevent("block", "192.0.2.9", "--for", "2h", "--reason", "bounces", "-c", ini).returncode == 0
        assert qpgevent("block", "2001:db8::/64", "--for", "15m", "-c", ini).returncode == 0
        found = sees(seen, "192.0.2.9", True)
        assert (found.network, found.reason) == ("192.0.2.9", "bounces")
        assert sees(seen, "2001:db8::1", True).network == "2001:db8::/64"
        assert seen.refusal("192.0.2.10") is None and seen.refusal("2001:db8:1::1") is None
        listed = json.loads(qpgevent("blocks", "-c", ini, "--json").stdout)
        assert [b["network"] for b in listed] == ["192.0.2.9", "2001:db8::/64"]
        # While nothing changes, a look costs one read: the version.
        seen.check_every = 3600
        wait_until(lambda: seen._looking.dead, 10, "the last look to end")
        before = worker_store.stats["operations"]
        for _ in range(100):
            assert seen.refusal("192.0.2.9") is not None
        assert worker_store.stats["operations"] == before  # no store call on the hot path
        seen.check_every = 0
        assert seen.refusal("192.0.2.9") is not None
        wait_until(lambda: seen._looking.dead, 10, "the look to end")
        assert worker_store.stats["operations"] - before == 1  # nothing changed: the version only
        assert qpgevent("release", "192.0.2.9", "-c", ini).returncode == 0
        sees(seen, "192.0.2.9", False)
        assert seen.refusal("2001:db8::2") is not None
        again = qpgevent("release", "192.0.2.9", "-c", ini)
        assert again.returncode == 1 and "not blocked" in again.stderr
        wrong = qpgevent("block", "mail.example.org", "-c", ini)
        assert wrong.returncode == 2 and "not an IP address or network" in wrong.stderr
        assert qpgevent("block", "192.0.2.1", "--for", "soon", "-c", ini).returncode == 2
    finally:
        worker_store.close()


def test_a_block_lapses_by_itself(store):
    seen = blocks.BlockList(lambda: store, check_every=0)
    blocks.block(store, "192.0.2.0/24", 3.0, "a short one")
    sees(seen, "192.0.2.77", True)
    sees(seen, "192.0.2.77", False)
    wait_until(lambda: blocks.listing(store) == [], 10, "the store to forget it")


def test_durations_and_addresses_are_checked():
    assert [blocks.parse_duration(text) for text in ("90", "90s", "15m", "1h", "2d", "1w", "1.5h")] == [
        90, 90, 900, 3600, 172800, 604800, 5400]
    for bad in ("", "0", "-1h", "1y", "h"):
        try:
            blocks.parse_duration(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    assert blocks.normalize("192.0.2.9/32") == "192.0.2.9"
    assert blocks.normalize("192.0.2.9/24") == "192.0.2.0/24"
    assert blocks.normalize("2001:DB8::1") == "2001:db8::1"
