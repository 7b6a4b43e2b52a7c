"""limit, every rule, on both store backends (embedded SQLite, and a real Redis).

Concurrency slots are leases: released when the session ends (the disconnect hook
runs after the client has gone, so tests wait for the slot with a deadline). Rates
are sliding windows of a second or two.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import RawClient, ServerProcess, wait_until, write_ini

from policy_helpers import ACCEPT, greeting, mail_rcpt, section, smtp_from


def limit(**options) -> str:
    return section("limit", **options) + ACCEPT


def opened(server, source: str = "127.0.0.1") -> RawClient:
    client = RawClient(server, source)
    assert client.reply()[0] == 220
    return client


def test_concurrency_per_address(policy_server):
    server = policy_server(limit(concurrency=2))
    first, second = opened(server), opened(server)
    refused = RawClient(server)
    assert refused.reply() == (421, "4.7.0 Too many concurrent connections from 127.0.0.1")
    assert refused.is_closed_by_server()
    other = opened(server, "127.0.0.2")  # its own slots
    assert first.command("QUIT")[0] == 221
    first.close()
    wait_until(lambda: greeting(server)[0] == 220, 5, "the slot freeing after QUIT")
    # That probe's own slot goes when the server sees it close: second's is left.
    wait_until(lambda: server.services.store.holders("limit:concurrency:127.0.0.1") == 1, 5, "the probe's slot released")
    for client in (second, refused, other):
        client.close()
    wait_until(lambda: server.services.store.holders("limit:concurrency:127.0.0.1") == 0, 5, "every slot released")


def test_connection_rate_per_address(policy_server):
    server = policy_server(limit(rate_conn="3/1.5s"))
    started = time.monotonic()
    assert [greeting(server)[0] for _ in range(3)] == [220, 220, 220]
    assert greeting(server) == (421, "4.7.0 Connection rate limit exceeded for 127.0.0.1")
    assert greeting(server, "127.0.0.2")[0] == 220
    wait_until(lambda: greeting(server)[0] == 220, 5, "the window sliding", 0.1)
    assert time.monotonic() - started >= 1.4


def test_recipients_per_connection_across_its_messages(policy_server):
    server = policy_server(limit(recipients=3))
    with smtp_from(server) as client:
        client.ehlo()
        assert client.sendmail("a@client.test", ["bob@example.test", "carol@example.test"], b"\r\nhi\r\n") == {}
        client.mail("a@client.test")
        assert client.rcpt("dave@example.test")[0] == 250
        assert client.rcpt("erin@example.test") == (452, b"4.5.3 Too many recipients")
        client.rset()
        client.mail("a@client.test")
        assert client.rcpt("erin@example.test") == (452, b"4.5.3 Too many recipients")
    assert [code for code, _ in mail_rcpt(server, "a@client.test", ["x@example.test"] * 3)] == [250, 250, 250]


def test_recipient_rate_per_address(policy_server):
    server = policy_server(limit(rate_rcpt_host="3/60"))
    assert [c for c, _ in mail_rcpt(server, "a@client.test", ["a@example.test", "b@example.test"])] == [250, 250]
    replies = mail_rcpt(server, "other@client.test", ["c@example.test", "d@example.test"])
    assert replies == [(250, b"2.1.5 <c@example.test>, recipient ok"),
                       (450, b"4.7.1 Recipient rate limit exceeded for 127.0.0.1")]
    assert mail_rcpt(server, "a@client.test", ["e@example.test"], source="127.0.0.2")[0][0] == 250


def test_recipient_rate_per_sender_whatever_the_address(policy_server):
    server = policy_server(limit(rate_rcpt_sender="2/60"))
    assert mail_rcpt(server, "Bulk@Client.Test", ["a@example.test"])[0][0] == 250
    assert mail_rcpt(server, "bulk@client.test", ["b@example.test", "c@example.test"], source="127.0.0.2") == [
        (250, b"2.1.5 <b@example.test>, recipient ok"),
        (450, b"4.7.1 Recipient rate limit exceeded for <bulk@client.test>")]
    assert mail_rcpt(server, "other@client.test", ["d@example.test"])[0][0] == 250
    assert [c for c, _ in mail_rcpt(server, "", ["a@example.test", "b@example.test", "c@example.test"])] \
        == [250, 250, 450]  # the null sender is one sender too


def test_exempt_networks_and_relay_clients_have_no_limits(policy_server):
    server = policy_server(section("relay", clients="127.0.0.3")
                           + limit(concurrency=1, rate_conn="1/60", recipients=1, exempt="127.0.0.2/32"))
    for source in ("127.0.0.2", "127.0.0.3"):
        held = [opened(server, source) for _ in range(3)]
        assert [c for c, _ in mail_rcpt(server, "a@client.test", ["a@example.test", "b@example.test"],
                                         source=source)] == [250, 250]
        for client in held:
            client.close()
    assert greeting(server)[0] == 220
    assert greeting(server)[0] == 421


def test_reject_0_only_logs(policy_server):
    server = policy_server(limit(rate_conn="1/60", reject="0"))
    assert [greeting(server)[0] for _ in range(3)] == [220, 220, 220]


@pytest.mark.parametrize("options, message", [({"rate_conn": "10"}, "not a rate"),
                                              ({"rate_rcpt_host": "x/5m"}, "not a rate"),
                                              ({"rate_rcpt_sender": "5/0"}, "longer than 0"),
                                              ({"exempt": "300.1.1.1"}, "not an address")])
def test_bad_options_are_load_errors(make_server, options, message):
    with pytest.raises(PluginLoadError, match=message):
        make_server(limit(**options))


# -- leases across real worker processes -------------------------------------------------------

def worker_pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+), generation \d+\) serving", log)]


def test_a_killed_workers_slots_are_free_again_within_the_lease_ttl(tmp_path, backend):
    """kill -9 the worker holding an address's 5 slots: they free within [store] lease_ttl."""
    ttl = 2.0
    ini = write_ini(tmp_path, limit(concurrency=5), workers=1, store_lease_ttl=ttl, **backend)
    server = ServerProcess(ini)
    held: list[RawClient] = []
    try:
        held = [opened(server) for _ in range(5)]
        refused = RawClient(server)
        assert refused.reply() == (421, "4.7.0 Too many concurrent connections from 127.0.0.1")
        refused.close()
        (worker,) = worker_pids(server.log())
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: len(worker_pids(server.log())) == 2, 10, "the master respawning the worker")

        def take_slot():
            client = RawClient(server)
            if client.reply()[0] == 220:
                held.append(client)
                return len(held) >= 10
            client.close()
            return False

        wait_until(take_slot, ttl + 5, "five slots again", 0.1)
        assert time.monotonic() - killed < ttl + 2  # the TTL, plus a respawn
        extra = RawClient(server)
        assert extra.reply()[0] == 421  # five, not more: the dead worker's are gone, not doubled
        extra.close()
    finally:
        for client in held:
            client.close()
        assert server.terminate() == 0, server.log()
