"""PROXY protocol headers (HAProxy's spec, versions 1 and 2): bytes in, addresses out.

A load balancer in front of us opens each TCP connection with one PROXY header that
says who the real client is. This module only parses; the server decides whom to
believe (only proxies listed in the config) and what to do on errors (421 and close).
Pure code: no sockets.

Strict, because what a proxy says becomes the client's address, which goes into our
Received header, the log and every plugin's checks: a v1 line is printable ASCII only,
addresses are plain IPv4 or IPv6 (``ipaddress`` would also take an IPv6 scope id, ``%``
and then anything but a space, CR and markup included: refused), ports are 0-65535.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # spec 2.1: the longest v1 line, CRLF included
V2_MAX = 16 + 0xFFFF  # spec 2.2: 16 octets, then at most 65535 of addresses and TLVs
_V2_HEADER = struct.Struct("!12sBBH")


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    #: False for v2 LOCAL and v1 UNKNOWN: the proxy speaks for itself (health checks),
    #: so the connection's own addresses stand.
    proxied: bool
    source_ip: str = ""
    source_port: int = 0
    dest_ip: str = ""
    dest_port: int = 0


def parse(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    """``(header, octets consumed)``, or None if more bytes are needed; ProxyError if bad."""
    if buffer[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(buffer)] and buffer[:1] == b"\r":
        return _parse_v2(buffer)
    if buffer[:len(V1_PREFIX)] == V1_PREFIX[:len(buffer)]:
        return _parse_v1(buffer)
    raise ProxyError("no PROXY header")


def looks_like_header(data: bytes) -> bool:
    """Whether ``data`` opens with a PROXY header: the v1 prefix or the whole v2 signature.

    For spotting a proxy we were not told to trust; not a validation (``parse`` is).
    """
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


def _parse_v1(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    end = buffer.find(b"\r\n")
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyError("PROXY v1 line too long")
        return None
    if end + 2 > V1_MAX:
        raise ProxyError("PROXY v1 line too long")
    try:
        line = buffer[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    if not line.isprintable():
        raise ProxyError("PROXY v1 line holds control characters")
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(1, False), end + 2  # spec 2.1: the rest of the line is ignored
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError("malformed PROXY v1 line")
    version = 4 if words[1] == "TCP4" else 6
    source, dest = _ip(words[2], version), _ip(words[3], version)
    return ProxyHeader(1, True, source, _port(words[4]), dest, _port(words[5])), end + 2


def _parse_v2(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    if len(buffer) < _V2_HEADER.size:
        return None
    signature, version_command, family, length = _V2_HEADER.unpack_from(buffer)
    if signature != V2_SIGNATURE:
        raise ProxyError("bad PROXY v2 signature")
    if version_command >> 4 != 2:
        raise ProxyError("unsupported PROXY version")
    total = _V2_HEADER.size + length
    if len(buffer) < total:
        return None
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL
        return ProxyHeader(2, False), total
    if command != 0x1:
        raise ProxyError("unknown PROXY v2 command")
    body = buffer[_V2_HEADER.size:total]
    if family == 0x11:  # TCP over IPv4
        if len(body) < 12:
            raise ProxyError("PROXY v2 address block too short")
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
    elif family == 0x21:  # TCP over IPv6
        if len(body) < 36:
            raise ProxyError("PROXY v2 address block too short")
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
    elif family == 0x00:  # UNSPEC: keep the connection's addresses
        return ProxyHeader(2, False), total
    else:
        raise ProxyError("unsupported PROXY v2 address family")
    # TLVs after the addresses are allowed by the spec and ignored here.
    return ProxyHeader(2, True, str(ipaddress.ip_address(src)), sport,
                       str(ipaddress.ip_address(dst)), dport), total


def _ip(text: str, version: int) -> str:
    if "%" in text:  # a scope id names an interface of the proxy's host, not a client
        raise ProxyError(f"bad address {text!r} in PROXY v1 line: no scope id allowed")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad address {text!r} in PROXY v1 line") from None
    if address.version != version:
        raise ProxyError("PROXY v1 address does not match its protocol")
    return str(address)


def _port(text: str) -> int:
    # Spec 2.1: ports are decimal without leading zeros, 0-65535.
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyError(f"bad port {text!r} in PROXY v1 line")
    return int(text)
