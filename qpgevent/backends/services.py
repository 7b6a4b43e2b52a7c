"""The services of one server, and who the client is at connect.

``Services.from_settings(settings)`` builds a server's services from its config: the DNS
resolver (``[dns]``: nameservers, timeout, its own cache) and the state store
(``[store]``). The server makes them current in each session's context (``bind``), so the
module-level ``qpgevent.dns`` and ``qpgevent.store`` functions every plugin calls reach the
services of the server running that session: two servers in one process, with different
``[dns]``, each ask their own nameservers. ``with services.active():`` does the same for a
block (plugin setup, the harness, a test). ``configure_services(settings)`` builds them
and makes them current in the calling greenlet (the master, each worker after fork).
Metrics stay per process: prometheus-client's multiprocess mode has one folder per
process (``[admin]``, one per master), and a process serves one configured server.

``identify(connection, settings, log)``
runs at connect, between the pre_connection and connect hooks: the client's name by
forward-confirmed reverse DNS (``[dns] reverse_lookup``) and its ident answer (``[ident]``),
both at once, each within its own timeout. A name or an answer is set on the connection
only when the look-up succeeds; a failure or a timeout is logged and leaves it unset, so
the session goes on, at most ``max(dns timeout, ident timeout)`` later.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

import gevent

from . import dns, ident, store
from ..config import Settings
from ..connection import Connection
from ..core.errors import ConfigError
from ..core.scope import Scoped

__all__ = ["Services", "configure_services", "current", "identify"]

log = logging.getLogger("qpgevent.services")


class Services:
    """One server's resolver and state store, handed to its sessions (and so to its plugins)."""

    def __init__(self, resolver: dns.Resolver, store_service: store.Service) -> None:
        self.resolver = resolver
        self.store_service = store_service

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Build them from ``[dns]`` and ``[store]``; nothing is connected yet.

        Raises ConfigError when no nameserver is configured and /etc/resolv.conf has none,
        or the store options are wrong.
        """
        nameservers = list(settings.dns_nameservers) or None
        try:
            resolver = dns.Resolver(nameservers, settings.dns_port, settings.dns_timeout,
                                    cache=settings.dns_cache_size > 0, cache_size=max(1, settings.dns_cache_size))
        except ConfigError as error:
            raise ConfigError(f"{settings.path}: [dns] nameservers: {error}") from None
        try:
            shared = store.from_options(**settings.store)
        except ValueError as error:
            raise ConfigError(f"{settings.path}: [store]: {error}") from None
        log.debug("DNS: %r; store: %s", resolver, shared.store.backend)
        return cls(resolver, shared)

    @property
    def store(self) -> store.Store:
        return self.store_service.store

    def bind(self) -> None:
        """Make these the services of the rest of this context: a session's greenlet."""
        _current.set(self)
        dns.bind(self.resolver)
        store.bind(self.store_service)

    @contextlib.contextmanager
    def active(self) -> Iterator[Services]:
        """``with services.active():`` the plugin API reaches these services inside."""
        with Scoped(_current, self), dns.use(self.resolver), store.use(self.store_service):
            yield self

    def close(self) -> None:
        """Close the store's connections (the resolver holds none between look-ups)."""
        self.store.close()


_current: contextvars.ContextVar[Services | None] = contextvars.ContextVar("qpgevent_services", default=None)


def current() -> Services | None:
    """The services made current in this context (``bind``, ``active``), or None."""
    return _current.get()


def configure_services(settings: Settings) -> Services:
    """Build the services of ``settings`` and make them current in the calling greenlet.

    For a process that serves one configured server: the master calls it before loading
    the plugins (their setup may look names up) and again in each worker after fork, so
    that each worker has its own resolver and cache and its own store connections (nothing
    inherited from the master); a server built there takes them (``SmtpServer``). The
    services they replace in this context are closed; a reload applies a new ``[dns]``
    and ``[store]`` that way.
    """
    services = Services.from_settings(settings)
    previous = _current.get()
    if previous is not None and previous.store is not services.store:
        previous.close()
    services.bind()
    return services


def identify(connection: Connection, settings: Settings, logger: Any = log) -> None:
    """Set ``connection.remote_host`` (FCrDNS) and ``remote_info`` (ident), as the settings ask.

    The outcome of the reverse look-up is recorded in the connection's results, as
    ``reverse_lookup``: pass ``fcrdns`` (remote_host is the confirmed name), fail (no PTR
    name, or none that gives the address back) or err (the DNS did not answer in time);
    the evidence ``fcrdns`` says it as a word: "pass", "fail" or "temperror". Never raises for DNS or
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
        connection.results.record("reverse_lookup", _OUTCOMES[outcome], "fcrdns", fcrdns=outcome,
                                  name=name, problem=why or None)
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


#: The reverse look-up's outcome word -> the results' outcome.
_OUTCOMES = {"pass": "pass", "fail": "fail", "temperror": "err"}
