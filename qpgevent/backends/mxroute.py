"""Where mail for a domain goes: static routes first, else its MX records (RFC 5321 5.1).

Owns the routing of the outbound queue: ``destination(domain, ...)`` gives a ``Route``
(``smtp_client``'s: the servers to try, in order) for a recipient domain, or raises
``RoutingError`` saying whether the failure is for good.

- A static route (``example.test:HOST[:PORT]``, ``*:smarthost:587``, the syntax of
  ``queue/smtp_forward``'s ``routes``) wins over the DNS.
- MX records in preference order; hosts of equal preference in random order (RFC 5321
  5.1: spread the load), every address of a host (A and AAAA, as ``families`` allows)
  before the next host.
- No MX record: the domain itself, with preference 0 (the "implicit MX", RFC 5321 5.1),
  if it has addresses; no MX and no address: a permanent failure.
- A null MX (a single ``0 .``, RFC 7505): the domain accepts no mail, a permanent
  failure (5.1.10); MX hosts whose names do not resolve are skipped.
- A DNS that cannot answer now: a temporary failure (the message is deferred).

And ``addresses_of(host)``: where to dial a hop named by host name (a static route's, a
relay plugin's), through the same resolver as the MX hosts.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

from . import dns
from .relay_routes import Hop, Route, route_for

__all__ = ["RoutingError", "addresses_of", "destination"]


class RoutingError(Exception):
    """No server to hand the mail to; ``permanent`` says whether trying later could help."""

    def __init__(self, text: str, permanent: bool) -> None:
        super().__init__(text)
        self.permanent = permanent


def destination(domain: str, routes: list[Route], port: int = 25, families: str = "all",
                resolver: dns.Resolver | None = None,
                shuffle: Callable[[list[str]], None] = random.shuffle) -> Route:
    """The servers for ``domain``, best first (see the module docstring)."""
    static = route_for(routes, domain) if routes else None
    if static is not None:
        return static
    resolver = resolver or dns.default()
    try:
        records = resolver.mx(domain)
        if records == [(0, ".")] or (records and all(host in (".", "") for _, host in records)):
            raise RoutingError(f"5.1.10 {domain} accepts no mail (null MX, RFC 7505)", permanent=True)
        hosts = _by_preference(records, shuffle) if records else [domain]
        hops: list[Hop] = []
        temporary: list[str] = []
        for host in hosts:
            try:
                addresses = _addresses(resolver, host, families)
            except dns.TemporaryFailure as error:
                temporary.append(str(error))
                continue
            hops += [Hop(address, port, host) for address in addresses
                     if not any((hop.host, hop.port) == (address, port) for hop in hops)]
    except dns.TemporaryFailure as error:
        raise RoutingError(f"4.4.3 DNS: {error}", permanent=False) from None
    if hops:
        return Route(domain, tuple(hops))
    if temporary:
        raise RoutingError(f"4.4.3 DNS: {temporary[0]}", permanent=False)
    if records:
        raise RoutingError(f"5.4.4 no address for the MX hosts of {domain}", permanent=True)
    raise RoutingError(f"5.1.2 {domain} has no MX and no address", permanent=True)


def _by_preference(records: list[tuple[int, str]], shuffle: Callable[[list[str]], None]) -> list[str]:
    groups: dict[int, list[str]] = {}
    for preference, host in records:
        if host not in (".", ""):
            groups.setdefault(preference, []).append(host)
    ordered: list[str] = []
    for preference in sorted(groups):
        hosts = list(dict.fromkeys(groups[preference]))
        shuffle(hosts)
        ordered += hosts
    return ordered


def _addresses(resolver: dns.Resolver, host: str, families: str) -> list[str]:
    if families == "ipv4":
        return resolver.a(host)
    if families == "ipv6":
        return resolver.aaaa(host)
    return resolver.addresses(host)


def addresses_of(host: str) -> list[str]:
    """Where to dial a hop named ``host``: its addresses from qpgevent's resolver (``[dns]``'s
    servers, which find the MX hosts too), else ``host`` itself for the system's resolver
    (names only /etc/hosts knows). Addresses, unix sockets and ``localhost`` (RFC 6761 6.3:
    never sent to the DNS) go as they are."""
    bare = host.lower().rstrip(".")
    if host.startswith("/") or _is_address(host) or bare == "localhost" or bare.endswith(".localhost"):
        return [host]
    try:
        return dns.current().addresses(host) or [host]
    except dns.TemporaryFailure:
        return [host]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
