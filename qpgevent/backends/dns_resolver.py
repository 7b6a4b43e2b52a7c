"""The resolver: ``Resolver`` (one per server, in each worker), its cache, and the names it asks about.

Look-ups go through dnspython's stub resolver, made cooperative by gevent; what they
return (empty results, ``TemporaryFailure``, A-label host names) is the contract told in
``qpgevent.dns``, which plugins use. A name is made (IDNA 2008, reversed for PTR and
blocklists) once and memoised.

The cache (one per resolver: per server, in each worker) is dnspython's LRU cache: it honours TTLs, keeps
NXDOMAIN and no-data answers for the SOA minimum (RFC 2308 5), and drops the least
recently used answer when full; we cap how long any answer stays.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from typing import Any

import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import gevent.monkey

from . import metrics
from ..core.errors import ConfigError
from .dns_budget import _budget, parallel

log = logging.getLogger("qpgevent.dns")

#: IDNA 2008 with the UTS 46 mapping (case folding, as MTAs and browsers do).
IDNA = dns.name.IDNA_2008_Practical
#: A client chooses its own PTR records: fcrdns follows at most this many names.
MAX_PTR_NAMES = 10
#: RFC 5782 2.1: a DNSBL lists an address with an A record in 127.0.0.0/8. Anything else
#: is a resolver that rewrites NXDOMAIN, or a dead list answering for the whole world;
#: 127.255.255.0/24 is where lists (Spamhaus) put their error codes ("you query through
#: a public resolver"). Neither is a listing.
LISTING = ipaddress.ip_network("127.0.0.0/8")
LIST_ERRORS = ipaddress.ip_network("127.255.255.0/24")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TemporaryFailure(Exception):
    """The DNS cannot answer now: SERVFAIL, REFUSED, timeout, no nameserver, budget used up."""


# -- the cache -------------------------------------------------------------------
class _Cache(dns.resolver.LRUCache):
    """dnspython's LRU cache (negative answers included), with how long an answer stays capped."""

    def __init__(self, max_size: int, max_ttl: float, max_negative_ttl: float) -> None:
        super().__init__(max_size)
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl

    def put(self, key: Any, value: dns.resolver.Answer) -> None:
        # NXDOMAIN and no-data answers have no rrset; RFC 2308 5 caps their TTL too.
        cap = self.max_ttl if value.rrset is not None else self.max_negative_ttl
        value.expiration = min(value.expiration, time.time() + cap)
        super().put(key, value)


# -- the resolver ----------------------------------------------------------------
class Resolver:
    """Look-ups against ``nameservers`` (None: /etc/resolv.conf's) at ``port``.

    ``timeout`` bounds one look-up, retries included; ``try_timeout`` one query to one
    server (default: ``timeout``, at most 2 s, so a lost UDP packet is sent again).
    """

    def __init__(self, nameservers: list[str] | None = None, port: int = 53, timeout: float = 5.0,
                 cache: bool = True, *, try_timeout: float | None = None, cache_size: int = 10000,
                 max_ttl: float = 86400, max_negative_ttl: float = 900) -> None:
        if nameservers is None:
            try:
                resolver = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as error:
                raise ConfigError("no nameservers configured, and /etc/resolv.conf gives none: "
                                  f"{error}") from None
        else:
            if not nameservers:
                raise ConfigError("no nameservers configured")
            resolver = dns.resolver.Resolver(configure=False)
            try:
                resolver.nameservers = list(nameservers)
            except ValueError as error:
                raise ConfigError(f"nameservers: {error}") from None
        if not gevent.monkey.is_module_patched("socket"):
            log.warning("socket is not patched by gevent: every DNS look-up blocks the whole process")
        resolver.port = port
        resolver.lifetime = timeout
        resolver.timeout = try_timeout or min(timeout, 2.0)
        resolver.retry_servfail = False  # SERVFAIL now is SERVFAIL a moment later: 4xx at once
        resolver.cache = _Cache(cache_size, max_ttl, max_negative_ttl) if cache else None
        self._resolver = resolver
        self.nameservers = [str(server) for server in resolver.nameservers]
        self.port = port
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<Resolver {self.nameservers} port {self.port} timeout {self.timeout}s>"

    def flush(self) -> None:
        """Forget every cached answer."""
        if self._resolver.cache is not None:
            self._resolver.cache.flush()

    # -- record types ------------------------------------------------------------
    def a(self, name: str) -> list[str]:
        return [rdata.address for rdata in self._records(name, dns.rdatatype.A)]

    def aaaa(self, name: str) -> list[str]:
        return [rdata.address for rdata in self._records(name, dns.rdatatype.AAAA)]

    def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, host), best first. A null MX (RFC 7505) is ``[(0, ".")]``."""
        return sorted((rdata.preference, _host(rdata.exchange))
                      for rdata in self._records(name, dns.rdatatype.MX))

    def txt(self, name: str) -> list[str]:
        """One string per TXT record, its character-strings joined (RFC 7208 3.3)."""
        return [b"".join(rdata.strings).decode("utf-8", "replace")
                for rdata in self._records(name, dns.rdatatype.TXT)]

    def ptr(self, ip: str) -> list[str]:
        """The names of ``ip`` (in-addr.arpa or ip6.arpa)."""
        qname = _REVERSED.get(ip)
        if qname is None:
            qname = _remember(_REVERSED, ip, dns.reversename.from_address(str(_ip(ip))))
        return [_host(rdata.target) for rdata in self._records(qname, dns.rdatatype.PTR)]

    def addresses(self, name: str) -> list[str]:
        """A and AAAA, asked at once. One family failing is not fatal if the other answers."""
        results = parallel([(self.a, name), (self.aaaa, name)], return_exceptions=True)
        found = [address for result in results if isinstance(result, list) for address in result]
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures and not found:
            raise failures[0]
        return found

    # -- checks ------------------------------------------------------------------
    def blocklist(self, ip: str, zone: str) -> list[str] | None:
        """The listing values (A records in 127.0.0.0/8) of ``ip`` in DNSBL ``zone``, or None."""
        values = self.a(_blocklist_name(ip, zone))
        listed = [value for value in values if _is_listing(value)]
        if len(listed) < len(values):
            log.warning("%s answered %s for %s: not a listing (RFC 5782 2.1), ignored",
                        zone, ", ".join(v for v in values if v not in listed), ip)
        return listed or None

    def blocklist_reason(self, ip: str, zone: str) -> str | None:
        """Why ``ip`` is listed in ``zone`` (its TXT record, or "listed in <zone>"), or None."""
        if self.blocklist(ip, zone) is None:
            return None
        try:
            texts = self.txt(_blocklist_name(ip, zone))
        except TemporaryFailure:
            texts = []  # the listing is known; its reason is only a courtesy
        reason = " ".join(texts).strip()
        # It ends up in an SMTP reply: no line breaks or control characters.
        reason = "".join(c if c.isprintable() else " " for c in reason)
        return reason or f"listed in {zone}"

    def fcrdns(self, ip: str) -> str | None:
        """Forward-confirmed reverse DNS: a PTR name of ``ip`` whose A/AAAA records include it."""
        address = _ip(ip)
        names = self.ptr(str(address))[:MAX_PTR_NAMES]
        forward = self.a if address.version == 4 else self.aaaa
        results = parallel([(forward, name) for name in names], return_exceptions=True)
        failure = None
        for name, result in zip(names, results):
            if isinstance(result, TemporaryFailure):
                failure = failure or result
            elif isinstance(result, BaseException):
                raise result
            elif any(ipaddress.ip_address(value) == address for value in result):
                return name
        if failure is not None:
            raise failure  # an unconfirmed name might have confirmed: we cannot say no
        return None

    # -- the one place that asks -------------------------------------------------
    def _records(self, name: str | dns.name.Name, rdtype: dns.rdatatype.RdataType) -> list[Any]:
        qname = name if isinstance(name, dns.name.Name) else _to_name(name)
        if qname is None:
            return []
        cache = self._resolver.cache
        if cache is not None:
            # What dnspython's resolve would answer from its cache, without its query
            # machinery. Nothing is waited for, so no budget is spent.
            cached = cache.get((qname, rdtype, dns.rdataclass.IN))
            if cached is not None:  # not a look-up for the metrics: it would flatter the latency
                return list(cached) if cached.rrset is not None else []  # no data: NoAnswer
            cached = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
            if cached is not None and cached.response.rcode() == dns.rcode.NXDOMAIN:
                return []  # dnspython keeps NXDOMAIN under ANY: the name has no type at all
        lifetime = self.timeout
        current = _budget.get()
        left = None if current is None else current.remaining()
        if left is not None and left < lifetime:
            lifetime = left  # 0 still answers from the cache: dnspython looks there first
        started, outcome = time.monotonic(), "answer"
        try:
            with current.spending() if current is not None else contextlib.nullcontext():
                answer = self._resolver.resolve(qname, rdtype, search=False, lifetime=lifetime)
        except dns.resolver.NXDOMAIN:
            outcome = "nxdomain"
            return []
        except dns.resolver.NoAnswer:
            outcome = "nodata"
            return []
        except dns.resolver.LifetimeTimeout:
            outcome = "timeout"
            if lifetime < self.timeout:
                raise TemporaryFailure(f"{_what(qname, rdtype)}: DNS time budget used up") from None
            raise TemporaryFailure(f"{_what(qname, rdtype)}: no answer in {self.timeout}s") from None
        except dns.exception.DNSException as error:
            outcome = "error"
            raise TemporaryFailure(f"{_what(qname, rdtype)}: {error}") from None
        finally:
            # Only what went to the network: cache hits (returned above, NXDOMAIN included)
            # would flatter the latency.
            metrics.observe_dns(time.monotonic() - started, outcome)
        return list(answer)


def ascii_name(text: str) -> str | None:
    """``text`` as the DNS sees it: lower case, A-labels, no final dot; None if it cannot be a name.

    The IDNA 2008 form look-ups use (``Bücher.test`` is ``xn--bcher-kva.test``). No
    look-up; not a host-name syntax check either (``_dmarc`` and ``a b`` are DNS labels).
    """
    name = _to_name(text)
    return None if name is None else _host(name)


#: Names already made: the same clients, hosts and zones come back all day, and making a
#: name (IDNA, reversed octets) is the dearest part of a look-up answered from the cache.
#: A memo is emptied when full: simpler than LRU, and what is still in use comes back.
_PARSED: dict[str, dns.name.Name] = {}  #: text -> its name (``_to_name``)
_REVERSED: dict[str, dns.name.Name] = {}  #: IP text -> its in-addr.arpa / ip6.arpa name
MEMO_SIZE = 10000


def _remember(memo: dict[str, dns.name.Name], key: str, name: dns.name.Name) -> dns.name.Name:
    if len(memo) >= MEMO_SIZE:
        memo.clear()
    memo[key] = name
    return name


def _what(qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> str:
    """A look-up as an error message names it: ``mail.example.test MX``."""
    return f"{qname.to_text(omit_final_dot=True)} {dns.rdatatype.to_text(rdtype)}"


def _to_name(text: str) -> dns.name.Name | None:
    """An absolute name, IDNA 2008-encoded; None for text that cannot be a DNS name."""
    name = _PARSED.get(text)
    if name is None:
        name = _parse_name(text)
        if name is not None:
            _remember(_PARSED, text, name)
    return name


def _parse_name(text: str) -> dns.name.Name | None:
    try:
        name = dns.name.from_text(text, origin=dns.name.root, idna_codec=IDNA)
    except dns.name.NoIDNA2008:
        raise  # the idna package is missing: a broken install must not look like NXDOMAIN
    except (dns.exception.DNSException, ValueError) as error:
        log.debug("%r is not a DNS name: %s", text, error)
        return None
    if name == dns.name.root:
        return None  # "", "." or "@": nobody's host
    return name


def _host(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _ip(ip: str) -> IpAddress:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"{ip!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _blocklist_name(ip: str, zone: str) -> dns.name.Name:
    """RFC 5782 2.1 and 2.4: the octets (IPv4) or nibbles (IPv6) of ``ip``, reversed, in ``zone``."""
    origin = _to_name(zone)
    if origin is None:
        raise ValueError(f"{zone!r} is not a DNS zone name")
    return dns.reversename.from_address(str(_ip(ip)), origin, origin)


def _is_listing(value: str) -> bool:
    address = ipaddress.ip_address(value)
    return address in LISTING and address not in LIST_ERRORS


__all__ = ["IDNA", "LISTING", "LIST_ERRORS", "MAX_PTR_NAMES", "MEMO_SIZE", "Resolver", "TemporaryFailure",
           "ascii_name"]
