"""PROXY protocol v1/v2 parsing: every form the spec allows, and what it forbids."""

import struct

import pytest

from qpgevent.core.proxy import V2_SIGNATURE, ProxyError, ProxyHeader, looks_like_header, parse


def v2(command=0x1, family=0x11, addresses=b"", tlvs=b""):
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_v1_tcp4():
    header, used = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n")
    assert header == ProxyHeader(1, True, "192.0.2.1", 56324, "198.51.100.2", 25)
    assert used == len(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n")


def test_v1_tcp6_is_normalised():
    header, _ = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::1 4000 25\r\n")
    assert (header.source_ip, header.dest_ip) == ("2001:db8::1", "::1")


def test_v1_unknown_keeps_connection_addresses():
    header, used = parse(b"PROXY UNKNOWN whatever\r\n")
    assert header == ProxyHeader(1, False) and used == 24


@pytest.mark.parametrize("partial", [b"P", b"PROXY", b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 2"])
def test_v1_incomplete_needs_more(partial):
    assert parse(partial) is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # a word missing
    b"PROXY TCP4 192.0.2.999 198.51.100.2 1 25\r\n",  # bad address
    b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n",  # family mismatch
    b"PROXY TCP4 192.0.2.1 198.51.100.2 070 25\r\n",  # leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n",  # port out of range
    b"PROXY UDP4 192.0.2.1 198.51.100.2 1 25\r\n",
    b"PROXY TCP4 192.0.2.1  198.51.100.2 1 25\r\n",  # double space
    b"EHLO client.test\r\n",  # no header at all
    b"PROXY TCP4 " + b"1" * 120,  # too long without CRLF
])
def test_v1_malformed(line):
    with pytest.raises(ProxyError):
        parse(line)


def test_v2_tcp4_with_tlvs_ignored():
    addresses = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 25)
    data = v2(addresses=addresses, tlvs=b"\x04\x00\x01x") + b"EHLO"
    header, used = parse(data)
    assert header == ProxyHeader(2, True, "192.0.2.1", 56324, "198.51.100.2", 25)
    assert data[used:] == b"EHLO"


def test_v2_tcp6():
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes(15) + b"\x01"
    header, _ = parse(v2(family=0x21, addresses=src + dst + struct.pack("!HH", 1, 25)))
    assert (header.source_ip, header.dest_ip, header.source_port) == ("2001:db8::1", "::1", 1)


def test_v2_local_keeps_connection_addresses():
    assert parse(v2(command=0x0, family=0x00)) == (ProxyHeader(2, False), 16)


def test_v2_incomplete_at_every_length():
    data = v2(addresses=bytes(8) + struct.pack("!HH", 1, 2))
    for cut in range(1, len(data)):
        assert parse(data[:cut]) is None, cut
    assert parse(data) is not None


@pytest.mark.parametrize("data", [
    v2(command=0x2),  # unknown command
    v2(family=0x12, addresses=bytes(12)),  # UDP is not for SMTP
    v2(family=0x11, addresses=bytes(6)),  # address block too short
    V2_SIGNATURE + bytes([0x31, 0x11, 0, 0]),  # version 3
])
def test_v2_malformed(data):
    with pytest.raises(ProxyError):
        parse(data)


@pytest.mark.parametrize("data, expected", [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n", True),
    (b"PROXY UNKNOWN\r\n", True),
    (v2(), True),
    (V2_SIGNATURE, True),
    (b"\r\n\r\n", False),  # an empty command line or two: only the whole v2 signature counts
    (b"PROXY", False),
    (b"EHLO client.test\r\n", False),
    (b"", False),
])
def test_looks_like_header(data, expected):
    assert looks_like_header(data) is expected
