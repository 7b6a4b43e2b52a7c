"""A hop named by host name (a static route's, a relay plugin's) is found through the server's
own resolver, the ``[dns]`` servers that find the MX hosts, not only through the system's."""

from __future__ import annotations

import pytest

from qpgevent import dns
from qpgevent.backends.mxroute import addresses_of
from qpgevent.backends.relay_routes import Hop
from qpgevent.backends.smtp_downstream import ClientOptions, Downstream
from qpgevent.testing import InProcessServer, write_ini
from qpgevent.testing.dns import LoopbackDns

ZONES = {"hops.test": {
    "smart": [("A", "127.0.0.1")],
    # The first address refuses (nothing listens on 127.0.0.2); the second answers.
    "two": [("A", "127.0.0.2"), ("AAAA", "::1")],
}}


@pytest.fixture(scope="module")
def resolver():
    with LoopbackDns(ZONES) as server:
        yield dns.Resolver(["127.0.0.1"], port=server.port, timeout=3, cache=False)


def test_a_hop_name_gets_the_addresses_the_servers_dns_gives(resolver):
    with dns.use(resolver):
        assert addresses_of("smart.hops.test") == ["127.0.0.1"]
        assert addresses_of("two.hops.test") == ["127.0.0.2", "::1"]


def test_addresses_sockets_and_localhost_go_as_they_are(resolver):
    with dns.use(resolver):
        for host in ("192.0.2.7", "2001:db8::7", "/run/dovecot/lmtp", "localhost", "LOCALHOST.", "mx.localhost"):
            assert addresses_of(host) == [host]


def test_a_name_the_dns_does_not_know_or_cannot_answer_for_goes_to_the_system_resolver(resolver):
    with dns.use(resolver):
        assert addresses_of("unknown.hops.test") == ["unknown.hops.test"]  # NXDOMAIN: /etc/hosts may know it
    dead = dns.Resolver(["127.0.0.1"], port=9, timeout=0.5, cache=False)
    with dns.use(dead):
        assert addresses_of("smart.hops.test") == ["smart.hops.test"]


def test_a_downstream_dials_each_address_in_turn_and_keeps_the_name_for_tls(resolver, tmp_path):
    server = InProcessServer(write_ini(tmp_path, "[[rcpt_ok]]\n[[queue/discard]]\n", listen="[::1]:0"))
    try:
        with dns.use(resolver):
            downstream = Downstream(Hop("two.hops.test", server.port), ClientOptions(helo="client.test")).open()
        try:
            assert downstream.smtp is not None
            assert downstream.smtp.sock.getpeername()[0] == "::1"
            assert downstream.smtp._host == "two.hops.test"  # the name SNI and the certificate check use
        finally:
            downstream.quit()
    finally:
        server.stop()
