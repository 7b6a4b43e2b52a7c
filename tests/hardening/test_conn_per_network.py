"""Issue 21, item 7b: ``max_conn_ip`` counts an IPv6 client with its whole /64.

One end site gets a /64: counted per address, it could open 2**64 times the limit. The
keying is checked on the shared table of the pre-fork master (``SharedTable``) and the
single-process counters; end to end, a trusted proxy names several addresses of one /64
(the PROXY protocol lets it name any client) and the limit holds for the /64 while
another /64, and IPv4 per address, are counted apart.
"""

from __future__ import annotations

import socket

import pytest

from qpgevent.server.shared_counters import LocalCounters, SharedTable, WorkerCounters

HOSTS_ALLOW = "[[hosts_allow]]\n  max_conn_ip = 2\n{extra}[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n"


@pytest.fixture(params=["local", "shared"])
def counters(request):
    if request.param == "local":
        yield LocalCounters()
        return
    table = SharedTable(rows=2, capacity=64)
    yield WorkerCounters(table, 0)
    table.close()


def hold(counters, *ips):
    leases = []
    for ip in ips:
        lease = counters.acquire(1000)
        lease.set_ip(ip)
        leases.append(lease)
    return leases


def test_networks_count_every_address_inside_them(counters):
    leases = hold(counters, "2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1",
                  "192.0.2.7", "192.0.2.8", "198.51.100.1")
    assert counters.count("2001:db8:1:2::1") == 1  # an address is still one address
    assert counters.count("2001:db8:1:2::/64") == 2
    assert counters.count("2001:db8:1:3::/64") == 1
    assert counters.count("2001:db8:1::/48") == 3
    assert counters.count("2001:db8:1:2::/63") == 3  # not on an octet boundary
    assert counters.count("2001:db8:1:2::/65") == 1
    assert counters.count("192.0.2.0/24") == 2
    assert counters.count("192.0.2.8/31") == 1
    assert counters.count("0.0.0.0/0") == 3
    assert counters.count("::/0") == 6  # IPv4 clients are ::ffff:a.b.c.d
    for lease in leases:
        lease.release()
    assert counters.count("2001:db8::/32") == 0


def test_a_pending_session_is_in_no_network(counters):
    counters.acquire(1000)  # its PROXY header has not come yet
    assert counters.count("::/0") == 0
    assert counters.count("ff00::/8") == 0


def proxied_session(server, source: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    family = "TCP6" if ":" in source else "TCP4"
    dest = "2001:db8::25" if ":" in source else "198.51.100.25"
    sock.sendall(f"PROXY {family} {source} {dest} 40000 25\r\n".encode())
    return sock, sock.recv(1000)


@pytest.mark.parametrize("extra, same_network, limit_text", [
    ("", ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"], "2001:db8:1:2::/64"),
    ("  ipv6_prefix = 128\n", ["2001:db8:1:2::1", "2001:db8:1:2::1", "2001:db8:1:2::1"], "2001:db8:1:2::1"),
    ("  ipv4_prefix = 24\n", ["192.0.2.1", "192.0.2.2", "192.0.2.3"], "192.0.2.0/24"),
])
def test_max_conn_ip_holds_for_a_network(make_server, extra, same_network, limit_text):
    server = make_server(HOSTS_ALLOW.format(extra=extra), proxy_trusted="127.0.0.1")
    held = []
    try:
        for source in same_network[:2]:
            sock, greeting = proxied_session(server, source)
            held.append(sock)
            assert greeting.startswith(b"220"), greeting
        sock, refusal = proxied_session(server, same_network[2])
        held.append(sock)
        assert refusal == f"421 4.7.0 too many connections from {limit_text}, try again later\r\n".encode()
        # Another network (and, by default, another IPv4 address) is counted apart.
        other = "2001:db8:1:3::1" if ":" in same_network[0] else "192.0.3.1"
        sock, greeting = proxied_session(server, other)
        held.append(sock)
        assert greeting.startswith(b"220"), greeting
    finally:
        for sock in held:
            sock.close()


def test_ipv4_is_counted_per_address_by_default(make_server):
    server = make_server(HOSTS_ALLOW.format(extra=""), proxy_trusted="127.0.0.1")
    held = [proxied_session(server, ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")]
    try:
        assert [greeting[:3] for _, greeting in held] == [b"220"] * 3
    finally:
        for sock, _ in held:
            sock.close()
