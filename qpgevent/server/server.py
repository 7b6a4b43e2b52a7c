"""The listening side: sockets, a greenlet for each connection, the connection limit, stop.

Accepts on each listen address (``qpgevent.server.listener``). Each accepted socket gets a
``Connection`` and a ``Driver`` (its conversation over the socket) in a greenlet of its own
while it runs (one of the crew's, which serve one connection after another); a session idle
past ``[limits] park_after`` gives its greenlet up and waits parked
(``qpgevent.server.parking``), and gets a new one when its client speaks. Beyond
``max_connections`` a client gets ``421 4.3.2`` and is closed at once, never left hanging
in the backlog.
Near ``max_connections`` the host is in stress, and idle sessions are shed to keep
places for newcomers (``qpgevent.server.shedding``). ``stop`` stops accepting, gives
sessions in flight up to ``shutdown_timeout`` to end, then closes the rest with 421.

On its own (tests, embedding) a server binds its listen addresses and counts sessions
for itself. Under the pre-fork master (``master``), each worker's server serves the
sockets the master bound, and counts sessions in a table shared by every worker, so
``max_connections`` and the per-address count hold for the whole host.

A connection from a proxy listed in ``[proxy] trusted`` first gives its PROXY header
(v1 or v2), which names the real client; everything after (the limits, the hooks, the
session) sees that client. A bad header, or none in ``[proxy] timeout``, gets 421 4.7.0.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent

from ..backends import metrics
from ..backends.services import Services
from ..backends.services import current as current_services
from ..core import proxy
from ..config import Listen, Settings
from ..connection import Connection
from ..engine.chains import listener_chains
from ..engine.hooks import HookRunner
from .parking import Parking, Pause
from .shedding import Shedder
from ..plugin import Plugin, ip_in
from ..core.reply import Canned, Reply, reply
from ..engine.session import Session
from .driver import Driver
from .listener import Crew, Listener, fixed_local_address
from . import steering
from .shared_counters import Counters, Lease, LocalCounters
from .timers import take_plugin_timeout
from .tls import TlsContexts

log = logging.getLogger("qpgevent.server")
#: Connections the kernel queues for accept (it caps this at net.core.somaxconn). A burst
#: that overflows it is worse than slow: past the queue, Linux answers with SYN cookies,
#: and a client whose handshake ACK is then dropped believes it is connected and waits
#: for a greeting that never comes (636 of 10,000 Locust users ramped at 500/s, with 1024).
BACKLOG = 4096


def normalize_ip(ip: str) -> str:
    """``::ffff:192.0.2.1`` is 192.0.2.1: one client, one address, whatever the listener.

    Also in the form ``::ffff:c000:201``, which a PROXY v2 header gives after ``str()``.
    """
    if not ip.startswith("::ffff:"):
        return ip
    address = ipaddress.ip_address(ip)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped else ip


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((listen.host, listen.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bind_listeners(listens: tuple[Listen, ...]) -> tuple[list[socket.socket], list[tuple[Listen, str]]]:
    """Bind every address: (the sockets, the addresses skipped and why).

    An IPv6 address the machine cannot bind (no IPv6) is skipped when there are others;
    any other failure closes what was bound and raises OSError.
    """
    sockets: list[socket.socket] = []
    skipped: list[tuple[Listen, str]] = []
    for listen in listens:
        try:
            sockets.append(bind(listen))
            _BOUND[sockets[-1].fileno()] = listen
        except OSError as error:
            optional = ":" in listen.host and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
            if optional and len(listens) > 1:
                skipped.append((listen, error.strerror or str(error)))
                continue
            for sock in sockets:
                sock.close()
            raise
    return sockets, skipped


def describe_listener(sock: socket.socket) -> Listen:
    host, port = sock.getsockname()[:2]
    return Listen(host, port)


#: Socket fd -> the listener it was bound for: the master binds, its forked workers look up.
_BOUND: dict[int, Listen] = {}


def _policy_of(sock: socket.socket, listens: list[Listen]) -> Listen:
    """The configured listener (with its policy) a bound socket serves: as bound, else by address."""
    bound = _BOUND.get(sock.fileno())
    if bound is not None:
        return bound
    host, port = sock.getsockname()[:2]
    for listen in listens:
        if listen.port == port and (listen.host == host or listen.host in ("0.0.0.0", "::")):
            return listen
    return Listen(host, port)


def close_gracefully(sock: socket.socket, linger: float = 1.0) -> None:
    """Close so that our last reply survives: send FIN, drain briefly, then close.

    Closing a socket that still holds unread input (a client that pipelined past our
    421, or talked before the greeting) makes the kernel send RST, which can destroy the
    reply still in flight. So we stop writing, read and drop what comes for at most
    ``linger`` seconds or until the client closes, and only then close.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(linger)
        for _ in range(16):  # at most 1 MiB of leftovers
            if not sock.recv(1 << 16):
                break
    except OSError:
        log.debug("connection already gone at close")
    finally:
        sock.close()


def close_after_quit(sock: socket.socket, raw: _socket.socket | None = None) -> None:
    """Close a connection whose client said QUIT: at once, if it sent nothing more.

    Such a client reads our 221 and closes; there is nothing to drain, and waiting for its
    FIN costs a turn of the loop per connection. A client that did send more (or a TLS
    socket, which cannot peek) is closed gracefully, as any other. One that reset the
    connection (smtp-source closes so, without reading our 221) has nothing left to save.
    """
    try:
        if raw is not None:  # the OS socket under a plain gevent socket: not blocking already
            peeked = raw.recv(1, socket.MSG_PEEK)
        else:
            sock.settimeout(0)
            peeked = sock.recv(1, socket.MSG_PEEK)
        if peeked:
            close_gracefully(sock)
            return
    except (BlockingIOError, ConnectionResetError):
        pass  # nothing unread (a close sends FIN, never RST), or the client is gone
    except (OSError, ValueError):  # ValueError: an SSLSocket refuses flags
        close_gracefully(sock)
        return
    sock.close()


def read_proxy_header(sock: socket.socket, timeout: float) -> proxy.ProxyHeader:
    """Read one PROXY header off ``sock`` within ``timeout`` seconds, and not one octet more.

    The client's first bytes may come in the same segment (a client that talks before
    our greeting, or pipelines), and they must stay in the socket for the session, and
    for earlytalker's look at it. So we peek, and take only what the parser says is the
    header; while the parser wants more, all we peeked is header and safe to take before
    waiting for the rest. Raises ProxyError, TimeoutError, EOFError or OSError.
    """
    deadline = time.monotonic() + timeout
    taken = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        peeked = sock.recv(proxy.V2_MAX, socket.MSG_PEEK)
        if not peeked:
            raise EOFError
        parsed = proxy.parse(taken + peeked)
        wanted = len(peeked) if parsed is None else parsed[1] - len(taken)
        while wanted:  # already in the kernel's buffer: no wait here
            chunk = sock.recv(wanted)
            if not chunk:
                raise EOFError
            taken += chunk
            wanted -= len(chunk)
        if parsed is not None:
            return parsed[0]


class SmtpServer:
    def __init__(self, settings: Settings, plugins: list[Plugin], counters: Counters | None = None,
                 services: Services | None = None) -> None:
        self.settings = settings
        #: Its resolver and store, current in each of its sessions: given, or the ones made
        #: current where it is built (configure_services), or built from its settings.
        self.services = services or current_services() or Services.from_settings(settings)
        self.runner = HookRunner(plugins, settings.plugin_timeout, timeout=take_plugin_timeout)
        #: [listeners]: (listener, its runner, its own plugins) where its chain is not [plugins].
        self.chains = [(listen, HookRunner(chain, settings.plugin_timeout, timeout=take_plugin_timeout), own)
                       for listen, chain, own in listener_chains(settings, plugins)]
        self.servers: list[Listener] = []
        #: What holds a connection now: the greenlet serving it, or the session if parked.
        self.sessions: set[Any] = set()
        #: Sessions idle past [limits] park_after wait here, without a greenlet.
        self.parking = Parking(settings.park_after, self._resume)
        #: Sessions open, in all and per client address: this process's, or the host's.
        self.counters: Counters = counters if counters is not None else LocalCounters()
        #: Stress mode: idle sessions shed and timeouts shortened near max_connections.
        self.shedder = Shedder(self, settings, self.counters)
        #: Bound once, not per session: every driver holds them (an idle session's bytes count).
        self._peers, self._command_timeout = self.counters.count, self.shedder.command_timeout
        # Room above the limit so that refusals are answered rather than left queued. A
        # greenlet of the crew runs ``handle``, which closes the socket (that of a parked
        # session outlives the run it was accepted in).
        self.crew = Crew(self.handle, settings.max_connections + max(16, settings.max_connections // 8))
        #: [tls]: the certificates (None: no STARTTLS, no implicit TLS); a load error is a ConfigError.
        self.tls = TlsContexts(settings) if settings.tls_certificate else None
        #: Addresses the operator blocked ([store]), and the greenlet of each session by conn id.
        self.blocks = steering.block_list(self.services)
        self.holding: dict[str, Any] = {}

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [server.socket.getsockname()[:2] for server in self.servers]

    def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve ``sockets`` (bound by the master), or bind every listen address ourselves.

        Binding ourselves, an unavailable IPv6 address is skipped with a warning.
        """
        for _, _, own in self.chains:  # the common plugins had theirs from whoever built us
            HookRunner(own).notify("post_fork", None)
        listens = list(self.settings.listen)
        if sockets is None:
            sockets, skipped = bind_listeners(self.settings.listen)
            for listen, reason in skipped:
                log.warning("not listening on %s: %s", listen, reason)
                listens.remove(listen)
            for sock, listen in zip(sockets, listens):
                flags = f" ({listen.flags})" if listen.flags else ""
                log.info("listening on %s%s", describe_listener(sock), flags)
            policies = listens  # bound in order: the i-th socket is the i-th listener
        else:
            policies = [_policy_of(sock, listens) for sock in sockets]
        for sock, listen in zip(sockets, policies):
            server = Listener(sock, self.crew, listen, fixed_local_address(sock))
            server.start()
            self.servers.append(server)
        self.shedder.start()

    def handle(self, sock: socket.socket, address: Any, listen: Listen | None = None,
               local: tuple[str, int] | None = None) -> None:
        """Serve a connection just accepted from ``address`` (``local``: our address, when the
        listener's tells it; else the socket is asked)."""
        # A place under max_connections first (on every worker: the count is the host's),
        # before anything else is spent on the client; counted for its address in the same
        # step, unless a trusted proxy's header is to name the real client.
        ip = normalize_ip(address[0])
        trusted = self.settings.proxy_trusted
        proxied = bool(trusted) and ip_in(ip, list(trusted))
        known = None if proxied else ip
        try:
            lease = self.counters.acquire(self.settings.max_connections, known)
            if lease is None and self.shedder.check():  # no place: make room if we can, at once
                lease = self.counters.acquire(self.settings.max_connections, known)
            if lease is None:  # nothing of ours to shed: another worker may have some
                lease = self.shedder.wait_for_room(lambda: self.counters.acquire(self.settings.max_connections, known))
        except gevent.GreenletExit:  # the server stopping while it waited for a place
            self._refuse(sock, Canned.SHUTTING_DOWN)
            return
        except BaseException:
            sock.close()  # our listener leaves the closing to us
            raise
        if lease is None:
            log.warning("refused %s: %d sessions already", address[0], self.settings.max_connections)
            metrics.connection_refused("max_connections")
            self._refuse(sock)
            return
        try:
            self._handle(sock, ip, address[1], lease, listen, proxied, local)
        except BaseException:  # else released and closed where the session ended, or it parked
            lease.release()
            sock.close()
            raise

    def _handle(self, sock: socket.socket, ip: str, port: int, lease: Lease, listen: Listen | None,
                proxied: bool, local: tuple[str, int] | None) -> None:
        """Serve the connection: on return, ``lease`` is released and ``sock`` closed, or the session parked."""
        self.services.bind()  # this greenlet's context: the plugins of this session use our services
        address = local or sock.getsockname()
        connection = Connection(ip, port, normalize_ip(address[0]), address[1])
        greenlet = gevent.getcurrent()
        self.sessions.add(greenlet)
        # The header comes before the per-IP count and pre_connection: they must see the client.
        # Either refusal closes the socket.
        if (proxied and not self._proxied(sock, connection)) or steering.refused_as_blocked(self, sock, connection):
            self.sessions.discard(greenlet)
            lease.release()
            return
        if proxied:
            lease.set_ip(connection.remote_ip)  # from now on, counted for the client the header named
        driver = Driver(sock, connection, self.runner_for(listen), self.settings, self._peers,
                        listen=listen, tls=self.tls, parking=self.parking, command_timeout=self._command_timeout)
        self._serve(driver, lease, greenlet, driver.run)

    def runner_for(self, listen: Listen | None) -> HookRunner:
        """The hook runner of ``listen``'s plugin chain ([listeners]), else [plugins]'."""
        for chained, runner, _ in self.chains:
            if listen is not None and (chained.host, chained.port) == (listen.host, listen.port):
                return runner
        return self.runner

    def _resume(self, driver: Driver, timed_out: bool, lease: Lease) -> None:
        """A parked session woke (in a new greenlet, in its own context): go on with it."""
        self.run_parked(driver, lease, lambda: driver.resume(timed_out))

    def run_parked(self, driver: Driver, lease: Lease, part: Callable[[], Pause | None]) -> None:
        """Run ``part`` of a session that was parked, in the greenlet that now holds it."""
        self.sessions.discard(driver.session)
        greenlet = gevent.getcurrent()
        self.sessions.add(greenlet)
        self._serve(driver, lease, greenlet, part)

    def _serve(self, driver: Driver, lease: Lease, greenlet: Any,
               part: Callable[[], Pause | None]) -> bool:
        """Run ``part`` of the session; then close the connection, or park the session (True)."""
        pause = None
        self.holding[driver.session.connection.id] = greenlet
        try:
            pause = part()
        except gevent.GreenletExit:
            pass  # stopped by the server (or kicked); the session has said 421
        finally:
            self.holding.pop(driver.session.connection.id, None)
            self.sessions.discard(greenlet)
            if pause is None:
                lease.release()  # the session is over, even if the close lingers
                # The TLS socket after STARTTLS.
                if driver.client_quit:
                    close_after_quit(driver.sock, driver.raw)
                else:
                    close_gracefully(driver.sock)
                driver.conversation.runner.notify("post_connection", driver.session)
        if pause is None:
            return False
        self.sessions.add(driver.session)  # a parked session is held by itself, not a greenlet
        self.parking.park(driver, pause, lease)
        return True

    def end_session(self, conn_id: str, error: BaseException) -> bool:
        """Raise ``error`` in the greenlet serving session ``conn_id`` at its next turn, if it
        serves it still then (a greenlet of the crew goes on to other connections); whether
        a greenlet serves it now."""
        greenlet = self.holding.get(conn_id)
        if greenlet is None:
            return False

        def deliver() -> None:
            if self.holding.get(conn_id) is greenlet is not None:
                greenlet.throw(error)
        gevent.get_hub().loop.run_callback(deliver)
        return True

    def _proxied(self, sock: socket.socket, connection: Connection) -> bool:
        """Read the PROXY header of a trusted proxy into ``connection``; or 421, close, False."""
        where = f"conn={connection.id} proxy {connection.peer}"
        timeout = self.settings.proxy_timeout
        try:
            header = read_proxy_header(sock, timeout)
        except TimeoutError:
            problem, text = f"no PROXY header within {timeout:g}s", "No PROXY header in time"
        except proxy.ProxyError as error:
            problem, text = f"bad PROXY header: {error}", "Bad PROXY header"
        except EOFError:
            log.info("%s: closed before the end of its PROXY header", where)
            close_gracefully(sock)
            return False
        except OSError as error:
            log.info("%s: reading its PROXY header failed: %s", where, error)
            close_gracefully(sock)
            return False
        except gevent.GreenletExit:  # the server is stopping
            self._refuse(sock, Canned.SHUTTING_DOWN)
            return False
        else:
            connection.proxy_ip, connection.proxy_port = connection.remote_ip, connection.remote_port
            if header.proxied:  # else a health check: the proxy speaks for itself
                connection.remote_ip = normalize_ip(header.source_ip)
                connection.remote_port = header.source_port
                connection.local_ip, connection.local_port = normalize_ip(header.dest_ip), header.dest_port
            log.debug("%s: PROXY v%d for %s", where, header.version, connection.peer)
            return True
        log.warning("%s: %s; closing with 421", where, problem)
        metrics.connection_refused("proxy_header")
        self._refuse(sock, reply(421, "4.7.0", f"{self.settings.me} {text}, closing connection", close=True))
        return False

    def _refuse(self, sock: socket.socket, last_words: Reply = Canned.TOO_MANY_CONNECTIONS) -> None:
        try:
            sock.settimeout(5)
            sock.sendall(last_words.to_bytes())
        except OSError:
            log.debug("client gone before its 421")
        close_gracefully(sock)

    def stop_accepting(self) -> None:
        """Close the listeners (the kernel refuses new clients once no process holds them)."""
        for server in self.servers:
            server.close()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; let sessions finish for ``timeout`` seconds; close the rest with 421."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        self.stop_accepting()
        self.shedder.stop()
        self.parking.stop_parking()  # parked sessions wake: idle ones say 421, the rest wait in greenlets
        # Every session in a greenlet: the crew's (each from its accept on), and those woken from parking.
        resumed = self.parking.resumed
        if self.crew.busy or resumed:
            log.info("stopping: waiting up to %ss for %d session(s)", timeout, len(self.crew.busy) + len(resumed))
            deadline = time.monotonic() + timeout
            self.crew.join(timeout)
            if resumed:
                gevent.wait(list(resumed), timeout=max(0.0, deadline - time.monotonic()))
        if self.crew.busy or resumed:
            log.info("stopping: closing %d session(s) still open", len(self.crew.busy) + len(resumed))
            self.crew.kill()
            gevent.killall(list(resumed), block=True, timeout=5)
            self.crew.join(5)
        self.crew.close()
        self.servers = []
