"""The per-process services the config sets up, and who the client is at connect.

``configure_services(settings)`` makes this process's default DNS resolver from ``[dns]``
(the one ``qpgevent.dns`` and so every plugin uses). ``identify(connection, settings, log)``
runs at connect, between the pre_connection and connect hooks: the client's name by
forward-confirmed reverse DNS (``[dns] reverse_lookup``) and its ident answer (``[ident]``),
both at once, each within its own timeout. A name or an answer is set on the connection
only when the look-up succeeds; a failure or a timeout is logged and leaves it unset, so
the session goes on, at most ``max(dns timeout, ident timeout)`` later.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent

from . import dns, ident, store
from ..config import Settings
from ..connection import Connection
from ..core.errors import ConfigError

__all__ = ["configure_services", "configure_store", "identify"]

log = logging.getLogger("qpgevent.services")


def configure_services(settings: Settings) -> None:
    """Set up this process's services from ``settings``: the default DNS resolver, the store.

    Call it once in every process that serves sessions, before it accepts: the master
    (qpgevent/master.py) calls it before loading plugins and again in each worker after
    fork, so that each worker has its own resolver and its own cache (nothing shared
    between processes, nothing inherited from the master); InProcessServer calls it for
    tests. Calling it again replaces the resolver
    and so empties the cache: a reload applies a new ``[dns]`` that way.
    Raises ConfigError when no nameserver is configured and /etc/resolv.conf has none.
    """
    nameservers = list(settings.dns_nameservers) or None
    try:
        dns.configure(nameservers, settings.dns_port, settings.dns_timeout,
                      cache=settings.dns_cache_size > 0, cache_size=max(1, settings.dns_cache_size))
    except ConfigError as error:
        raise ConfigError(f"{settings.path}: [dns] nameservers: {error}") from None
    log.debug("DNS: %r", dns.default())
    configure_store(settings)


def configure_store(settings: Settings) -> None:
    """This process's shared state store from ``[store]`` (connections open on first use)."""
    try:
        store.configure(**settings.store)
    except ValueError as error:
        raise ConfigError(f"{settings.path}: [store]: {error}") from None


def identify(connection: Connection, settings: Settings, logger: Any = log) -> None:
    """Set ``connection.remote_host`` (FCrDNS) and ``remote_info`` (ident), as the settings ask.

    The outcome of the reverse look-up is kept in ``connection.notes["fcrdns"]``: "pass"
    (remote_host is the confirmed name), "fail" (no PTR name, or none that gives the
    address back) or "temperror" (the DNS did not answer in time). Never raises for DNS or
    network trouble, and returns within the larger of the two timeouts.
    """
    calls = []
    if settings.reverse_lookup:
        calls.append((_confirmed_name, connection.remote_ip, settings.dns_timeout))
    if settings.ident:
        if connection.proxy_ip:
            # Its ident host would see a connection from the balancer, not from us.
            logger.debug("ident: not asked, the connection came through proxy %s", connection.proxy_ip)
        else:
            calls.append((_ident, connection, settings.ident_timeout, settings.ident_port))
    if not calls:
        return
    results = dns.parallel(calls)
    said = []
    if settings.reverse_lookup:
        outcome, name, why = results.pop(0)
        connection.notes["fcrdns"] = outcome
        if name:
            connection.remote_host = name
        said.append(f"remote_host={name or '-'} fcrdns={outcome}{f' ({why})' if why else ''}")
    if results:
        connection.remote_info = results.pop(0)
        said.append(f"ident={connection.remote_info or '-'}")
    logger.info("client %s: %s", connection.remote_ip, " ".join(said))


def _confirmed_name(ip: str, seconds: float) -> tuple[str, str | None, str]:
    """("pass", name, "") or ("fail", None, "") or ("temperror", None, why), within ``seconds``."""
    # dns.fcrdns is a PTR look-up, then A/AAAA look-ups: each has the DNS timeout, the two
    # together must not take more either. The Timeout itself is raised, not an Exception
    # of ours: dnspython catches Exception around each query (and would try again).
    deadline = gevent.Timeout(seconds)
    try:
        with deadline:
            name = dns.fcrdns(ip)
    except gevent.Timeout as error:
        if error is not deadline:
            raise
        return "temperror", None, f"no confirmed answer within {seconds:g}s"
    except dns.TemporaryFailure as error:
        return "temperror", None, str(error)
    return ("pass", name, "") if name else ("fail", None, "")


def _ident(connection: Connection, seconds: float, port: int) -> str | None:
    with gevent.Timeout(seconds, False):  # ident.lookup keeps to it; this makes sure
        return ident.lookup(connection.remote_ip, connection.remote_port, connection.local_ip,
                            connection.local_port, timeout=seconds, port=port)
    return None
