"""Where a relayed message goes: routes (which next hop takes which domain) and hops.

Owns the ``routes`` option of the relay plugins and the outbound queue: parsing
``domain:HOST[:PORT]|HOST...`` (or an LMTP unix socket), and choosing the route for a
recipient domain (exact, longest ``.suffix``, then ``*``). Pure values, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


class ConfigurationError(ValueError):
    """An option that cannot work (a bad route, an unknown forward_client name)."""


@dataclass(frozen=True, slots=True)
class Hop:
    """One server: a host name or IP address and a port, or (LMTP) a unix socket path."""

    host: str
    port: int = 25
    #: The server's name when ``host`` is an address found for it (an MX host): the name
    #: its certificate is checked against. Part of the identity: a connection checked for
    #: one name (DANE, MTA-STS) is never reused for another name at the same address.
    name: str = ""

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    @property
    def where(self) -> str:
        if self.is_unix:
            return self.host
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    """The next hop for a domain (``example.test``, ``.example.test`` for its subdomains,
    ``*`` for the rest): one server, or several tried in order when one cannot be reached.

    Two routes to the same servers are the same next hop (equal, one pool).
    """

    domain: str = field(compare=False)
    hops: tuple[Hop, ...] = ()

    @property
    def where(self) -> str:
        return "|".join(hop.where for hop in self.hops)


def parse_routes(items: Iterable[str], default_port: int) -> list[Route]:
    """``domain:HOP`` or ``domain:HOP|HOP...``; a HOP is ``host``, ``host:port``,
    ``[v6]:port`` or ``/unix/socket``."""
    routes = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        domain, colon, targets = item.partition(":")
        domain = domain.strip().lower()
        if not colon or not domain or not targets.strip():
            raise ConfigurationError(f"route {item!r} is not DOMAIN:HOST[:PORT] or DOMAIN:/SOCKET")
        routes.append(Route(domain, tuple(_hop(t.strip(), item, default_port) for t in targets.split("|"))))
    if not routes:
        raise ConfigurationError("routes is empty: say where mail goes, e.g. routes = *:127.0.0.1:25")
    return routes


def _hop(target: str, item: str, default_port: int) -> Hop:
    if target.startswith("/"):
        return Hop(target, 0)
    if target.startswith("["):
        host, bracket, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"route {item!r}: IPv6 addresses go as [ADDRESS]:PORT")
    else:
        host, _, port_text = target.partition(":")
    if not host or (port_text and not port_text.isdigit()) or ":" in port_text:
        raise ConfigurationError(f"route {item!r}: bad host or port")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ConfigurationError(f"route {item!r}: port out of range")
    return Hop(host, port)


def route_for(routes: list[Route], domain: str) -> Route | None:
    """The exact domain first, then the longest ``.suffix``, then ``*``."""
    domain = domain.lower()
    best: Route | None = None
    for route in routes:
        if route.domain == domain:
            return route
        if route.domain.startswith(".") and domain.endswith(route.domain):
            if best is None or best.domain == "*" or len(route.domain) > len(best.domain):
                best = route
        elif route.domain == "*" and best is None:
            best = route
    return best


__all__ = ["ConfigurationError", "Hop", "Route", "parse_routes", "route_for"]
