"""DNS for plugins: cooperative look-ups, a per-server resolver and cache, a per-session time budget.

This module owns the resolver service every plugin uses. It is dnspython's stub resolver,
whose sockets gevent's monkey-patching makes cooperative: a plugin writes plain blocking
code (``dns.mx(domain)``) and thousands of sessions still look names up at the same time.

What a look-up returns:
- NXDOMAIN and no-data answers are empty results (``[]``, or ``None`` where the result is
  one value). So is a name that cannot exist in the DNS (an empty label, over 255
  octets): clients send such names, and they have no records.
- SERVFAIL, REFUSED, a timeout, no nameserver answering, the time budget used up: the
  ``TemporaryFailure`` exception, which a plugin turns into a 4xx.
- Host names come back lower-case, without the final dot, in A-label (``xn--``) form.
  A UTF-8 name given to a look-up is converted with IDNA 2008 and the UTS 46 mapping
  (``faß.de`` is ``xn--fa-hia.de``; IDNA 2003 would have made it ``fass.de``).

The module-level functions (``dns.a(name)``...) use the resolver of the server running
the current session: each server builds one from its ``[dns]``
(``qpgevent.backends.services``) and makes it current in each session's context
(``bind``), so two servers in one process each ask their own nameservers, with their
own cache. ``with dns.use(resolver):`` makes one current for a block (tests, tools);
greenlets started by ``parallel`` and ``ahead`` inherit it. Outside any server and any block, the
system's resolver (/etc/resolv.conf's, made on first use) answers.

The pieces live beside this module: the resolver, its cache and the making of names in
``dns_resolver``, the time budget, ``parallel`` (look-ups at once) and ``ahead`` (a
look-up started now, its result taken by a later hook) in ``dns_budget``; their names are
re-exported here, the plugin API's ``qpgevent.dns``.
"""

from __future__ import annotations

import contextvars

from ..core.scope import Scoped
# Every name plugins use as ``dns.NAME`` (the constants too: plugins/uribl.py, fcrdns.py).
from .dns_budget import Ahead, ahead, budget, parallel, remaining_budget
from .dns_resolver import (IDNA, LIST_ERRORS, LISTING, MAX_PTR_NAMES, MEMO_SIZE, Resolver, TemporaryFailure,
                           ascii_name)

__all__ = ["TemporaryFailure", "Resolver", "budget", "remaining_budget", "parallel", "Ahead", "ahead", "current",
           "default", "use", "bind", "a", "aaaa", "mx", "txt", "ptr", "addresses", "blocklist",
           "blocklist_reason", "fcrdns", "ascii_name"]


# -- the resolver in use -----------------------------------------------------------
#: The resolver of the server whose session runs in this context (a greenlet's own context:
#: set by the server for each session; inherited by ``parallel``'s greenlets; kept while a
#: session is parked). None: the system's.
_current: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("qpgevent_dns_resolver",
                                                                            default=None)
_system: Resolver | None = None


def current() -> Resolver:
    """The resolver in use here: the current server's, else the system's (/etc/resolv.conf)."""
    global _system
    resolver = _current.get()
    if resolver is not None:
        return resolver
    if _system is None:
        _system = Resolver()
    return _system


#: The name plugins have used: ``dns.default().a(name)``.
default = current


def bind(resolver: Resolver | None) -> None:
    """Make ``resolver`` current for the rest of this context (a session's greenlet)."""
    _current.set(resolver)


def use(resolver: Resolver) -> Scoped[Resolver]:
    """``with dns.use(resolver):`` the module-level calls inside use ``resolver``."""
    return Scoped(_current, resolver)


def a(name: str) -> list[str]:
    return current().a(name)


def aaaa(name: str) -> list[str]:
    return current().aaaa(name)


def mx(name: str) -> list[tuple[int, str]]:
    return current().mx(name)


def txt(name: str) -> list[str]:
    return current().txt(name)


def ptr(ip: str) -> list[str]:
    return current().ptr(ip)


def addresses(name: str) -> list[str]:
    return current().addresses(name)


def blocklist(ip: str, zone: str) -> list[str] | None:
    return current().blocklist(ip, zone)


def blocklist_reason(ip: str, zone: str) -> str | None:
    return current().blocklist_reason(ip, zone)


def fcrdns(ip: str) -> str | None:
    return current().fcrdns(ip)
