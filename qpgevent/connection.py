"""The Connection plugins see: who is talking to us, from where, and what they said.

Mirrors qpsmtpd's ``Qpsmtpd::Connection``. One per TCP session; it outlives
transactions. ``notes`` is free-form, shared by the plugins of this connection only;
``results`` is what each check concluded about the client (``qpgevent.results``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from .results import Results

_ids = itertools.count(1)


def host_port(host: str, port: int) -> str:
    """``host:port`` as logs and humans write it: ``192.0.2.1:25``, ``[::1]:41258`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: This process's id, in hex: asked once, and again in a forked child (not a system call per connection).
_pid = f"{os.getpid():x}"


def _forked() -> None:
    global _pid
    _pid = f"{os.getpid():x}"


os.register_at_fork(after_in_child=_forked)


def _new_id() -> str:
    # pid + counter: unique across the workers of one host, short enough for every log line.
    return f"{_pid}.{next(_ids):x}"


@dataclass(eq=False, slots=True, weakref_slot=True)  # slotted: idle sessions by the thousand
class Connection:
    remote_ip: str
    remote_port: int
    local_ip: str = ""
    local_port: int = 0
    remote_host: str | None = None  #: reverse DNS name, set only when a lookup succeeded
    remote_info: str | None = None  #: RFC 1413 ident answer, set only when asked and answered
    hello: str | None = None  #: "helo" or "ehlo", once accepted
    hello_host: str | None = None  #: the argument of the accepted HELO/EHLO
    relay_client: bool = False  #: may relay to any domain (set by relay, or by AUTH later)
    tls: bool = False  #: the session is encrypted
    #: The load balancer's own address when the connection came with a PROXY header (equal
    #: to remote_ip for the proxy's own health checks: v2 LOCAL, v1 UNKNOWN); None otherwise.
    proxy_ip: str | None = None
    proxy_port: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    #: Each check's verdict about this client (pass/fail/skip/err and evidence), by plugin.
    results: Results = field(default_factory=Results)
    id: str = field(default_factory=_new_id)

    @property
    def peer(self) -> str:
        """The client's address and port, for logs: ``192.0.2.1:41258``, ``[::1]:41258``."""
        return host_port(self.remote_ip, self.remote_port)

    def clone(self, no_reset: bool = False) -> Connection:
        """A new Connection for the same peer, sharing ``notes`` and ``results``; HELO must be said again.

        Used when the session restarts on the same socket (STARTTLS). Unless ``no_reset``,
        this object is reset, so only the clone keeps the notes.
        """
        twin = Connection(
            self.remote_ip, self.remote_port, self.local_ip, self.local_port,
            self.remote_host, self.remote_info, relay_client=self.relay_client,
            tls=self.tls, proxy_ip=self.proxy_ip, proxy_port=self.proxy_port,
            notes=self.notes, results=self.results, id=self.id,
        )
        if not no_reset:
            self.reset()
        return twin

    def successor(self, **attributes: Any) -> Connection:
        """Another client on this stream (XCLIENT): the given attributes, this one's
        encryption, proxy and id; no HELO, no notes, no results, not a relay client."""
        return Connection(**{"remote_ip": self.remote_ip, "remote_port": self.remote_port,
                             "local_ip": self.local_ip, "local_port": self.local_port, "tls": self.tls,
                             "proxy_ip": self.proxy_ip, "proxy_port": self.proxy_port, "id": self.id,
                             **attributes})

    def reset(self) -> None:
        self.notes = {}
        self.results = Results()
