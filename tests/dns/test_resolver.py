"""qpgevent.dns against a real NSD on loopback: every look-up, the cache, the budget, failures."""

from __future__ import annotations

import time

import gevent
import pytest

from qpgevent import dns
from qpgevent.core.errors import ConfigError
from qpgevent.testing.dns import (DeadDns, LoopbackDns, SlowDnsFront, blocklist_zone,
                                  ptr_zone_for)

ZONES = {
    "example.test": {
        # MX written worst first: the resolver must sort them.
        "@": [("MX", "20 backup.example.test."), ("MX", "10 mail.example.test."),
              ("TXT", '"v=spf1 ip4:192.0.2.0/24 -all"'), ("TXT", '"other=record"')],
        "mail": [("A", "192.0.2.25"), ("AAAA", "2001:db8::25")],
        "backup": [("A", "192.0.2.26")],
        "alias": [("CNAME", "mail.example.test.")],
        "split": [("TXT", '"v=spf1 ip4:192.0.2.0/24 " "include:other.test -all"')],
        "textonly": [("TXT", '"no address here"')],
        "nullmx": [("MX", "0 .")],
        "client": [("A", "203.0.113.5")],
        "liar": [("A", "203.0.113.99")],
        "match": [("A", "203.0.113.7")],
        "nomatch": [("A", "198.51.100.1")],
        "nomatch6": [("AAAA", "2001:db8::99")],
        "twice": [("A", "192.0.2.30"), ("A", "192.0.2.31")],
    },
    # bücher.test and faß.test, in their IDNA 2008 A-label forms.
    "xn--bcher-kva.test": {"@": [("MX", "10 mail.xn--bcher-kva.test.")],
                           "mail": [("A", "192.0.2.80")]},
    "xn--fa-hia.test": {"@": [("A", "192.0.2.81")]},
    **ptr_zone_for("127.0.0.0/8", {"127.0.0.1": "localhost.example.test."}),
    **ptr_zone_for("203.0.113.0/24", {
        "203.0.113.5": "client.example.test.",
        "203.0.113.6": "liar.example.test.",
        "203.0.113.7": ["nomatch.example.test.", "match.example.test."],
        "203.0.113.8": "Client.EXAMPLE.test.",
        "203.0.113.9": "missing.example.test.",
    }),
    **ptr_zone_for("2001:db8::/32", {"2001:db8::25": "mail.example.test.",
                                     "2001:db8::26": "nomatch6.example.test."}),
    **blocklist_zone("zen.test", {
        "127.0.0.2": ("127.0.0.2", "Listed: test entry, see http://zen.test/"),
        "127.0.0.3": ("127.0.0.3", None),
        "127.0.0.4": ("127.0.0.4", "line one\nline two"),
        "2001:db8::bad": ("127.0.0.4", "IPv6 listed"),
        "192.0.2.99": ("192.0.2.1", "a rewritten NXDOMAIN, not a listing"),
        "127.0.0.5": ("127.255.255.254", "query refused: public resolver"),
    }),
}


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES, servfail_zones=("broken.test",)) as server:
        yield server


@pytest.fixture(scope="module")
def counter(nsd):
    """A front without delay: it counts the queries that really reach the network."""
    with SlowDnsFront(nsd.port, delay=0) as front:
        yield front


@pytest.fixture
def resolver(nsd):
    return dns.Resolver(["127.0.0.1"], nsd.port, timeout=2.0)


def counted(counter, **options):
    return dns.Resolver(["127.0.0.1"], counter.port, timeout=2.0, **options)


# -- record types -------------------------------------------------------------------
def test_a_aaaa_mx_txt(resolver):
    assert resolver.a("mail.example.test") == ["192.0.2.25"]
    assert resolver.aaaa("mail.example.test") == ["2001:db8::25"]
    assert sorted(resolver.a("twice.example.test")) == ["192.0.2.30", "192.0.2.31"]
    assert resolver.mx("example.test") == [(10, "mail.example.test"), (20, "backup.example.test")]
    assert sorted(resolver.txt("example.test")) == ["other=record", "v=spf1 ip4:192.0.2.0/24 -all"]


def test_txt_strings_of_one_record_are_joined(resolver):
    assert resolver.txt("split.example.test") == ["v=spf1 ip4:192.0.2.0/24 include:other.test -all"]


def test_addresses_gives_a_and_aaaa(resolver):
    assert resolver.addresses("mail.example.test") == ["192.0.2.25", "2001:db8::25"]
    assert resolver.addresses("backup.example.test") == ["192.0.2.26"]
    assert resolver.addresses("nope.example.test") == []


def test_cname_is_followed(resolver):
    assert resolver.a("alias.example.test") == ["192.0.2.25"]


def test_null_mx(resolver):
    assert resolver.mx("nullmx.example.test") == [(0, ".")]


def test_names_with_final_dot_and_capitals(resolver):
    assert resolver.a("MAIL.Example.TEST.") == ["192.0.2.25"]


def test_ptr_ipv4_and_ipv6(resolver):
    assert resolver.ptr("127.0.0.1") == ["localhost.example.test"]
    assert resolver.ptr("203.0.113.5") == ["client.example.test"]
    assert resolver.ptr("2001:db8::25") == ["mail.example.test"]
    assert resolver.ptr("2001:0db8:0000::0025") == ["mail.example.test"]
    assert resolver.ptr("::ffff:203.0.113.5") == ["client.example.test"]  # IPv4-mapped
    assert sorted(resolver.ptr("203.0.113.7")) == ["match.example.test", "nomatch.example.test"]
    assert resolver.ptr("203.0.113.8") == ["client.example.test"]  # lower-cased


def test_ptr_of_something_not_an_ip_is_a_caller_error(resolver):
    with pytest.raises(ValueError, match="not an IP address"):
        resolver.ptr("mail.example.test")


def test_nxdomain_and_no_data_are_empty(resolver):
    assert resolver.a("nope.example.test") == []  # NXDOMAIN
    assert resolver.a("textonly.example.test") == []  # the name exists: no data
    assert resolver.mx("mail.example.test") == []
    assert resolver.txt("mail.example.test") == []
    assert resolver.aaaa("backup.example.test") == []
    assert resolver.ptr("127.0.0.9") == []
    assert resolver.ptr("2001:db8::77") == []


def test_names_that_cannot_exist_are_empty(resolver, counter):
    strict = counted(counter)
    before = counter.queries
    for name in ("", ".", "a..example.test", "x" * 64 + ".example.test", "a." * 130 + "test"):
        assert strict.a(name) == [], name
    assert counter.queries == before  # never asked


# -- IDN ----------------------------------------------------------------------------
def test_utf8_names_are_idna_encoded(resolver):
    assert resolver.a("mail.bücher.test") == ["192.0.2.80"]
    assert resolver.mx("bücher.test") == [(10, "mail.xn--bcher-kva.test")]
    assert resolver.a("MAIL.BÜCHER.TEST") == ["192.0.2.80"]  # UTS 46 folds case


def test_idna_2008_not_2003(resolver):
    # IDNA 2003 maps ß to "ss" (fass.test, a zone nobody serves: REFUSED, a TemporaryFailure);
    # IDNA 2008 keeps it: xn--fa-hia.test.
    assert resolver.a("faß.test") == ["192.0.2.81"]


# -- blocklists ---------------------------------------------------------------------
def test_blocklist(resolver):
    assert resolver.blocklist("127.0.0.2", "zen.test") == ["127.0.0.2"]
    assert resolver.blocklist("127.0.0.9", "zen.test") is None
    assert resolver.blocklist("2001:db8::bad", "zen.test") == ["127.0.0.4"]
    assert resolver.blocklist("2001:db8::bae", "zen.test") is None


def test_blocklist_answers_outside_127_8_are_not_listings(resolver, caplog):
    assert resolver.blocklist("192.0.2.99", "zen.test") is None
    assert resolver.blocklist("127.0.0.5", "zen.test") is None  # a list's error code
    assert "192.0.2.1" in caplog.text and "127.255.255.254" in caplog.text


def test_blocklist_reason(resolver):
    assert resolver.blocklist_reason("127.0.0.2", "zen.test") == "Listed: test entry, see http://zen.test/"
    assert resolver.blocklist_reason("127.0.0.3", "zen.test") == "listed in zen.test"
    assert resolver.blocklist_reason("127.0.0.4", "zen.test") == "line one line two"
    assert resolver.blocklist_reason("2001:db8::bad", "zen.test") == "IPv6 listed"
    assert resolver.blocklist_reason("127.0.0.9", "zen.test") is None
    assert resolver.blocklist_reason("192.0.2.99", "zen.test") is None


# -- forward-confirmed reverse DNS --------------------------------------------------
def test_fcrdns(resolver):
    assert resolver.fcrdns("203.0.113.5") == "client.example.test"
    assert resolver.fcrdns("203.0.113.7") == "match.example.test"  # one of two names confirms
    assert resolver.fcrdns("2001:db8::25") == "mail.example.test"
    assert resolver.fcrdns("::ffff:203.0.113.5") == "client.example.test"


def test_fcrdns_not_confirmed(resolver):
    assert resolver.fcrdns("203.0.113.6") is None  # its name points elsewhere
    assert resolver.fcrdns("203.0.113.9") is None  # its name does not exist
    assert resolver.fcrdns("2001:db8::26") is None
    assert resolver.fcrdns("127.0.0.9") is None  # no PTR at all
    assert resolver.fcrdns("127.0.0.1") is None  # localhost.example.test has no A


# -- failures -----------------------------------------------------------------------
def test_servfail_is_a_temporary_failure(resolver):
    with pytest.raises(dns.TemporaryFailure, match="SERVFAIL"):
        resolver.a("mail.broken.test")


def test_refused_is_a_temporary_failure(resolver):
    with pytest.raises(dns.TemporaryFailure, match="REFUSED"):
        resolver.a("mail.not-served.test")


def test_dead_nameserver_fails_within_the_timeout():
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=1.0)
        started = time.monotonic()
        with pytest.raises(dns.TemporaryFailure, match=r"no answer in 1\.0s"):
            resolver.a("mail.example.test")
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0, elapsed


def test_no_nameservers_is_a_config_error():
    with pytest.raises(ConfigError, match="no nameservers"):
        dns.Resolver([])
    with pytest.raises(ConfigError, match="nameservers"):
        dns.Resolver(["not an address"])


# -- the cache ------------------------------------------------------------------------
def test_answers_come_from_the_cache_within_their_ttl(counter):
    resolver = counted(counter)
    before = counter.queries
    for _ in range(3):
        assert resolver.a("mail.example.test") == ["192.0.2.25"]
        assert resolver.mx("example.test")[0] == (10, "mail.example.test")
    assert counter.queries - before == 2


def test_without_cache_every_lookup_asks(counter):
    resolver = counted(counter, cache=False)
    before = counter.queries
    for _ in range(3):
        assert resolver.a("mail.example.test") == ["192.0.2.25"]
    assert counter.queries - before == 3


def test_negative_answers_are_cached(counter):
    resolver = counted(counter)
    before = counter.queries
    for _ in range(3):
        assert resolver.a("nope.example.test") == []  # NXDOMAIN
        assert resolver.a("textonly.example.test") == []  # no data
    assert counter.queries - before == 2
    # NXDOMAIN says the name does not exist at all: no other type is asked for either.
    assert resolver.mx("nope.example.test") == []
    assert counter.queries - before == 2


def test_cache_answers_after_the_server_is_gone():
    with LoopbackDns({"gone.test": {"www": [("A", "192.0.2.7")]}}) as server:
        resolver = dns.Resolver(["127.0.0.1"], server.port, timeout=1.0)
        assert resolver.a("www.gone.test") == ["192.0.2.7"]
        assert resolver.a("nope.gone.test") == []
        server.stop()
        assert resolver.a("www.gone.test") == ["192.0.2.7"]
        assert resolver.a("nope.gone.test") == []
        with pytest.raises(dns.TemporaryFailure):  # the server really is gone
            resolver.a("other.gone.test")


def wait_for_query(counter, lookup, count, limit=5.0):
    """Repeat ``lookup`` until the counter reaches ``count``; seconds it took (bounded)."""
    started = time.monotonic()
    while counter.queries < count and time.monotonic() - started < limit:
        lookup()
        gevent.sleep(0.05)
    assert counter.queries == count, "the cached answer never expired"
    return time.monotonic() - started


def test_ttl_expiry():
    zones = {"short.test": {"www": [("A", "192.0.2.8")]}}
    with LoopbackDns(zones, ttl=1, negative_ttl=1) as server, SlowDnsFront(server.port, 0) as front:
        resolver = counted(front)
        assert resolver.a("www.short.test") == ["192.0.2.8"]
        assert front.queries == 1
        elapsed = wait_for_query(front, lambda: resolver.a("www.short.test"), 2)
        assert 0.5 <= elapsed < 3.0, elapsed
        assert resolver.a("nope.short.test") == []
        assert front.queries == 3
        elapsed = wait_for_query(front, lambda: resolver.a("nope.short.test"), 4)
        assert 0.5 <= elapsed < 3.0, elapsed


def test_negative_ttl_is_capped(counter):
    resolver = counted(counter, max_negative_ttl=1)  # the zone says 300 s
    assert resolver.a("nope.example.test") == []
    first = counter.queries
    elapsed = wait_for_query(counter, lambda: resolver.a("nope.example.test"), first + 1)
    assert 0.5 <= elapsed < 3.0, elapsed


def test_positive_ttl_is_capped(counter):
    resolver = counted(counter, max_ttl=1)
    assert resolver.a("mail.example.test") == ["192.0.2.25"]
    first = counter.queries
    elapsed = wait_for_query(counter, lambda: resolver.a("mail.example.test"), first + 1)
    assert 0.5 <= elapsed < 3.0, elapsed


def test_cache_is_bounded(counter):
    resolver = counted(counter, cache_size=2)
    before = counter.queries
    for name in ("mail", "backup", "client"):
        resolver.a(f"{name}.example.test")
    assert counter.queries - before == 3
    resolver.a("client.example.test")  # still there
    assert counter.queries - before == 3
    resolver.a("mail.example.test")  # least recently used: evicted
    assert counter.queries - before == 4


# -- time budget --------------------------------------------------------------------
def test_budget_shortens_a_lookup_and_then_refuses_at_once():
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=5.0)
        started = time.monotonic()
        with dns.budget(0.5):
            with pytest.raises(dns.TemporaryFailure, match="budget"):
                resolver.a("mail.example.test")
            first = time.monotonic() - started
            assert dns.remaining_budget() == 0.0
            with pytest.raises(dns.TemporaryFailure, match="budget"):
                resolver.mx("example.test")
            second = time.monotonic() - started - first
        assert dns.remaining_budget() is None
    assert 0.4 <= first < 1.5, first
    assert second < 0.2, second


def test_exhausted_budget_still_answers_from_the_cache(resolver):
    assert resolver.a("mail.example.test") == ["192.0.2.25"]
    with dns.budget(0):
        assert resolver.a("mail.example.test") == ["192.0.2.25"]
        with pytest.raises(dns.TemporaryFailure, match="budget"):
            resolver.a("backup.example.test")


def test_budget_counts_time_spent_waiting_on_dns_not_the_time_between():
    # A session budget must not run out while the session does something else (a long
    # DATA): only the seconds look-ups were pending are spent.
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=0.3)
        with dns.budget(1.0):
            with pytest.raises(dns.TemporaryFailure, match="no answer in 0.3s"):
                resolver.a("a.example.test")
            left = dns.remaining_budget()
            assert 0.55 <= left <= 0.72, left
            gevent.sleep(0.3)  # the time passing is what is tested: idle time is free
            assert dns.remaining_budget() == left


def test_budget_counts_look_ups_at_once_once():
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=0.3)
        with dns.budget(1.0):
            results = dns.parallel([(resolver.a, f"p{i}.example.test") for i in range(3)],
                                   return_exceptions=True)
            left = dns.remaining_budget()
    assert all(isinstance(result, dns.TemporaryFailure) for result in results)
    assert 0.55 <= left <= 0.72, left  # 0.3 s of waiting, not 0.9


def test_nested_budget_spends_from_the_outer_one_too():
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=0.3)
        with dns.budget(1.0):
            with dns.budget(5.0):
                with pytest.raises(dns.TemporaryFailure):
                    resolver.a("n.example.test")
            assert 0.55 <= dns.remaining_budget() <= 0.72


def test_nested_budget_the_tighter_wins():
    with dns.budget(10):
        with dns.budget(1):
            assert dns.remaining_budget() <= 1
        with dns.budget(100):
            assert 9 < dns.remaining_budget() <= 10


def test_budget_is_per_greenlet():
    seen = {}

    def other():
        seen["other"] = dns.remaining_budget()

    with dns.budget(5):
        gevent.spawn(other).join()
    assert seen == {"other": None}


# -- parallel -----------------------------------------------------------------------
def test_parallel_waits_for_the_slowest_not_the_sum(nsd):
    with SlowDnsFront(nsd.port, delay=0.5) as front:
        resolver = dns.Resolver(["127.0.0.1"], front.port, timeout=3.0, cache=False)
        started = time.monotonic()
        results = dns.parallel([
            (resolver.blocklist, "127.0.0.2", "zen.test"),
            (resolver.blocklist, "127.0.0.3", "zen.test"),
            (resolver.blocklist, "127.0.0.9", "zen.test"),
            (resolver.mx, "example.test"),
            lambda: resolver.a("mail.example.test"),
        ])
        elapsed = time.monotonic() - started
    assert results == [["127.0.0.2"], ["127.0.0.3"], None,
                       [(10, "mail.example.test"), (20, "backup.example.test")], ["192.0.2.25"]]
    assert 0.5 <= elapsed < 1.5, elapsed


def test_parallel_exceptions(resolver):
    calls = [(resolver.a, "mail.example.test"), (resolver.a, "x.broken.test"),
             (resolver.ptr, "not an ip")]
    with pytest.raises(dns.TemporaryFailure):
        dns.parallel(calls)
    ok, failed, wrong = dns.parallel(calls, return_exceptions=True)
    assert ok == ["192.0.2.25"]
    assert isinstance(failed, dns.TemporaryFailure) and isinstance(wrong, ValueError)
    assert dns.parallel([]) == []


def test_parallel_calls_share_the_callers_budget():
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=5.0)
        started = time.monotonic()
        with dns.budget(0.5):
            results = dns.parallel([(resolver.a, f"n{i}.example.test") for i in range(5)],
                                   return_exceptions=True)
        elapsed = time.monotonic() - started
    assert all(isinstance(r, dns.TemporaryFailure) and "budget" in str(r) for r in results)
    assert 0.4 <= elapsed < 1.5, elapsed


def test_parallel_stops_when_the_caller_times_out():
    with DeadDns() as dead:
        resolver = dns.Resolver(["127.0.0.1"], dead.port, timeout=5.0)
        started = time.monotonic()
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.3):
                dns.parallel([(resolver.a, "a.example.test"), (resolver.a, "b.example.test")])
        assert time.monotonic() - started < 1.0


# -- the module-level functions -----------------------------------------------------
def test_module_functions_use_the_resolver_in_use(nsd):
    configured = dns.Resolver(["127.0.0.1"], nsd.port, timeout=2.0)
    with dns.use(configured):
        check_module_functions(configured)
    assert dns.current() is not configured  # the block is over: nothing left behind


def check_module_functions(configured):
    assert dns.default() is configured and dns.current() is configured
    assert dns.a("mail.example.test") == ["192.0.2.25"]
    assert dns.aaaa("mail.example.test") == ["2001:db8::25"]
    assert dns.mx("bücher.test") == [(10, "mail.xn--bcher-kva.test")]
    assert dns.txt("split.example.test") == ["v=spf1 ip4:192.0.2.0/24 include:other.test -all"]
    assert dns.ptr("2001:db8::25") == ["mail.example.test"]
    assert dns.addresses("mail.example.test") == ["192.0.2.25", "2001:db8::25"]
    assert dns.blocklist("127.0.0.2", "zen.test") == ["127.0.0.2"]
    assert dns.blocklist_reason("127.0.0.3", "zen.test") == "listed in zen.test"
    assert dns.fcrdns("203.0.113.5") == "client.example.test"


def test_outside_any_server_the_system_resolver_answers():
    with open("/etc/resolv.conf", encoding="utf-8") as conf:
        listed = [line.split()[1] for line in conf if line.startswith("nameserver")]
    resolver = dns.default()
    assert resolver is dns.default()
    assert resolver.nameservers == listed and resolver.port == 53
