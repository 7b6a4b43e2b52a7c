"""The cooperative proof: slow DNS stalls only the greenlet that asked, never the server.

Against a real NSD behind a front that answers every query 1 s late: 500 concurrent
look-ups take about 1 s, not 500 s; 500 concurrent SMTP sessions whose connect hook
looks a name up all get their greeting in about 1 s. A nameserver that never answers
becomes a 421 within the configured DNS timeout.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import gevent
import pytest

from qpgevent import dns
from qpgevent.testing import wait_until
from qpgevent.testing.dns import DeadDns, LoopbackDns, SlowDnsFront

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "data" / "dns_plugins"
ZONES = {"example.test": {"mail": [("A", "192.0.2.25")]}}
DELAY = 1.0
SESSIONS = 500


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES) as server:
        yield server


@pytest.fixture
def slow_front(nsd):
    with SlowDnsFront(nsd.port, delay=DELAY) as front:
        yield front


def test_500_lookups_take_one_delay_not_500(slow_front):
    # No cache: every greenlet really waits on the network.
    resolver = dns.Resolver(["127.0.0.1"], slow_front.port, timeout=5.0, cache=False)
    started = time.monotonic()
    jobs = [gevent.spawn(resolver.a, "mail.example.test") for _ in range(500)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    elapsed = time.monotonic() - started
    print(f"500 lookups through a {DELAY}s front: {elapsed:.2f}s, {slow_front.queries} queries")
    assert [job.value for job in jobs] == [["192.0.2.25"]] * 500
    assert slow_front.queries >= 500
    assert DELAY <= elapsed < 10, elapsed


def greet(server, timeout=20):
    """Connect, read the greeting; (code, text, seconds it took)."""
    started = time.monotonic()
    client = smtplib.SMTP(timeout=timeout)
    try:
        code, text = client.connect(server.host, server.port)
    except smtplib.SMTPConnectError as refused:
        code, text = refused.smtp_code, refused.smtp_error
    finally:
        client.close()
    return code, text, time.monotonic() - started


def test_500_sessions_greeted_while_each_connect_waits_on_dns(make_server, slow_front):
    # The server's own [dns]: no cache, so that every session really waits on the network.
    server = make_server(plugins="[[lookup_at_connect]]", plugin_dirs=str(PLUGIN_DIR), max_connections=1000,
                         dns_nameservers="127.0.0.1", dns_port=slow_front.port, dns_timeout=5.0, dns_cache_size=0)
    started = time.monotonic()
    jobs = [gevent.spawn(greet, server) for _ in range(SESSIONS)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    elapsed = time.monotonic() - started
    print(f"{SESSIONS} sessions, each with a {DELAY}s DNS look-up at connect: {elapsed:.2f}s")
    assert [job.value[0] for job in jobs] == [220] * SESSIONS
    assert slow_front.queries >= SESSIONS  # every session really asked
    assert min(job.value[2] for job in jobs) >= DELAY  # and really waited
    assert elapsed < 10, elapsed


def test_dead_nameserver_is_a_421_within_the_dns_timeout(make_server):
    with DeadDns() as dead:
        server = make_server(plugins="[[lookup_at_connect]]", plugin_dirs=str(PLUGIN_DIR),
                             dns_nameservers="127.0.0.1", dns_port=dead.port, dns_timeout=1.0)
        started = time.monotonic()
        jobs = [gevent.spawn(greet, server) for _ in range(50)]
        gevent.joinall(jobs, timeout=30, raise_error=True)
        elapsed = time.monotonic() - started
    print(f"50 sessions against a dead nameserver (timeout 1s): {elapsed:.2f}s")
    assert [job.value[0] for job in jobs] == [421] * 50
    assert b"cannot look mail.example.test up now" in jobs[0].value[1]
    assert all(0.9 <= job.value[2] < 3.0 for job in jobs), [job.value[2] for job in jobs]
    assert elapsed < 3.0, elapsed


def test_a_lookup_asked_ahead_runs_while_the_caller_goes_on(nsd):
    # Every answer comes DELAY late: the look-up asked ahead is on the wire while the
    # caller has not asked for its result yet.
    with SlowDnsFront(nsd.port, delay=DELAY) as front, dns.use(dns.Resolver(["127.0.0.1"], front.port,
                                                                            timeout=5.0, cache=False)):
        cancelled = dns.ahead((dns.a, "mail.example.test"))
        cancelled.cancel()  # before it ran: never asked
        pending = dns.ahead((dns.a, "mail.example.test"))
        empty = dns.ahead((dns.a, "bad..name"))  # a name that cannot exist: [] without a query
        wait_until(lambda: front.queries == 1, timeout=10, what="the query asked ahead")
        assert pending.result() == ["192.0.2.25"]  # through the resolver of the caller's context
        assert empty.result() == []
        failing = dns.ahead((dns.blocklist, "not an address", "zen.test"))
        with pytest.raises(ValueError):
            failing.result()  # what the call raised, raised to the caller
    assert front.queries == 1
