"""Handing messages to a next hop over SMTP or LMTP: the client side of queue plugins.

Owns what ``queue/smtp_forward`` and ``queue/lmtp`` share: routes (which next hop takes
which domain), ``Downstream`` (one connection, on smtplib, which gevent makes cooperative:
greeting, EHLO/LHLO, STARTTLS, AUTH, XCLIENT/XFORWARD, one transaction with a reply per
recipient, DATA streamed from the spool and dot-stuffed), ``Pool`` (a bounded set of
reusable connections per route, per worker), and ``Relay``, which runs a whole queue
hand-off or an RCPT-time check ("callahead") and turns the replies into one verdict.

Theory of operation. A message is "queued" only when the next hop said 2xx to the end of
its DATA (for LMTP: to every recipient). The client hears about it once, after DATA, so
every outcome has to be folded into one reply:

- all recipients accepted, DATA accepted: 250, with the next hop's words;
- refused before DATA (MAIL, or one RCPT): nothing was sent, so RSET and pass the
  refusal on: 5xx when every recipient was refused for good, else 4xx, because a
  partial 250 would drop the refused recipients silently, and a 5xx would bounce the
  accepted ones. The cure is to find refusals at RCPT time: ``callahead`` asks the next
  hop about each recipient while the client is still at RCPT, so a refused recipient is
  refused to the client, individually, and the rest go through;
- LMTP's one reply per recipient after DATA (RFC 2033 4.2): all 2xx is 250; none is a
  refusal as above; a mix means some mailboxes have the message already, and SMTP has
  no way to say so after DATA. We answer 4xx (a retry duplicates it for the accepted
  recipients, where 250 would lose it for the others: RFC 5321 6.1 prefers a duplicate
  to a loss) and log which recipients have it;
- the connection broke, or timed out, before the final reply: 4xx. If it broke after
  the final dot, the next hop may have the message (RFC 1047's race), again a duplicate
  rather than a loss.

One transaction goes to one route: ``Relay.check_route`` refuses (4xx) a recipient whose
route differs from the ones already accepted, so the client sends it in a transaction of
its own, and no message is ever half delivered across two next hops.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from gevent.lock import BoundedSemaphore

from ..core.address import Address
from ..core.dsn_request import xtext
from ..plugin import DECLINED, DENY, DENYSOFT, OK, Plugin

log = logging.getLogger("qpgevent.smtp_client")

#: The options both plugins take, as configspec lines (defaults suit a smarthost).
CONFIGSPEC = """
routes = force_list(default=list())
callahead = boolean(default=False)
helo = string(default="")
starttls = option("auto", "required", "off", default="auto")
tls_verify = boolean(default=True)
tls_ca_file = path(default="")
auth_user = string(default="")
auth_password = string(default="")
auth_without_tls = boolean(default=False)
forward_client = force_list(default=list("xforward"))
pool_size = integer(min=1, default=10)
pool_wait = float(min=0, default=10)
idle_timeout = float(min=0, default=60)
connect_timeout = float(min=0.01, default=10)
command_timeout = float(min=0.01, default=60)
data_timeout = float(min=0.01, default=600)
"""

_EOL = re.compile(rb"\r\n|\n|\r")
#: Longest stretch without a line end held back while dot-stuffing (lines are shorter).
_STUFF_LIMIT = 1 << 16


class DownstreamError(Exception):
    """The next hop could not be reached or broke off; always temporary for our client."""


class ConfigurationError(ValueError):
    """An option that cannot work (a bad route, an unknown forward_client name)."""


# -- routes ------------------------------------------------------------------------


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


# -- replies and client facts ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One reply of the next hop."""

    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What XCLIENT / XFORWARD tell the next hop about our client (Postfix's names)."""

    addr: str
    port: int
    name: str | None = None  #: verified reverse DNS name; None: unknown
    helo: str | None = None
    proto: str = "SMTP"
    login: str | None = None
    ident: str | None = None  #: our transaction id (XFORWARD IDENT)
    destaddr: str | None = None
    destport: int | None = None

    @classmethod
    def of(cls, session: Any) -> ClientFacts:
        connection = session.connection
        transaction = session.current_transaction
        return cls(
            addr=connection.remote_ip, port=connection.remote_port, name=connection.remote_host,
            helo=connection.hello_host, proto="ESMTP" if connection.hello == "ehlo" else "SMTP",
            login=connection.notes.get("auth_user"),
            ident=transaction.id if transaction is not None else None,
            destaddr=connection.local_ip or None, destport=connection.local_port or None)

    def attributes(self, verb: str) -> dict[str, str]:
        addr = f"IPV6:{self.addr}" if ":" in self.addr else self.addr
        values = {"ADDR": addr, "PORT": str(self.port), "NAME": self.name or "[UNAVAILABLE]",
                  "HELO": self.helo or "[UNAVAILABLE]", "PROTO": self.proto}
        if verb == "XCLIENT":
            if self.login:
                values["LOGIN"] = self.login
            if self.destaddr:
                values["DESTADDR"] = f"IPV6:{self.destaddr}" if ":" in self.destaddr else self.destaddr
            if self.destport:
                values["DESTPORT"] = str(self.destport)
        else:
            values["SOURCE"] = "REMOTE"
            if self.ident:
                values["IDENT"] = self.ident
        return values


# -- the message on the wire -------------------------------------------------------


def dot_stuffed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The message as DATA carries it (RFC 5321 4.5.2), streamed, ``.\\r\\n`` included.

    Every line end becomes CRLF (a bare LF or CR, which the server keeps only when
    ``allow_bare_lf`` is on, must not reach the next hop as a line end it reads
    differently: SMTP smuggling), a dot that starts a line is doubled, and the message
    ends with CRLF before the final dot. Chunks may split lines anywhere.
    """
    tail, line_start = b"", True
    for chunk in chunks:
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) < _STUFF_LIMIT:
                tail = data
                continue
            cut = len(data) - 1 if data.endswith(b"\r") else len(data)  # CR may pair with a LF
        block, tail = data[:cut], data[cut:]
        yield _stuff(block, line_start)
        line_start = block.endswith(b"\n")
    if tail:
        block = _stuff(tail, line_start)
        yield block
        line_start = block.endswith(b"\r\n")
    yield b".\r\n" if line_start else b"\r\n.\r\n"


def _stuff(block: bytes, line_start: bool) -> bytes:
    block = _EOL.sub(b"\r\n", block).replace(b"\r\n.", b"\r\n..")
    return b"." + block if line_start and block.startswith(b".") else block


# -- one connection ----------------------------------------------------------------


@dataclass
class ClientOptions:
    helo: str = ""  #: our EHLO name; empty: the server's ``me``, filled in at first use
    lmtp: bool = False
    starttls: str = "auto"  #: auto (when offered), required, off
    tls_context: ssl.SSLContext | None = None
    auth_user: str = ""
    auth_password: str = field(default="", repr=False)
    auth_without_tls: bool = False
    forward_client: tuple[str, ...] = ("xforward",)  #: XCLIENT / XFORWARD, first offered wins
    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    data_timeout: float = 600.0
    #: Called after STARTTLS with the hop and the TLS socket: a reason to refuse the
    #: connection (a DANE or MTA-STS check that failed), or None.
    tls_check: Callable[[Hop, ssl.SSLSocket], str | None] | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], lmtp: bool) -> ClientOptions:
        forward = tuple(name.strip().lower() for name in config["forward_client"] if name.strip())
        unknown = sorted(set(forward) - {"xclient", "xforward", "none"})
        if unknown:
            raise ConfigurationError(f"forward_client: unknown {', '.join(unknown)} (xclient, xforward, none)")
        if config["auth_user"] and not config["auth_password"]:
            raise ConfigurationError("auth_user is set but auth_password is empty")
        context = None
        if config["starttls"] != "off":
            context = ssl.create_default_context(cafile=config["tls_ca_file"] or None)
            if not config["tls_verify"]:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return cls(
            helo=config["helo"], lmtp=lmtp, starttls=config["starttls"], tls_context=context,
            auth_user=config["auth_user"], auth_password=config["auth_password"],
            auth_without_tls=config["auth_without_tls"],
            forward_client=tuple(name for name in forward if name != "none"),
            connect_timeout=config["connect_timeout"], command_timeout=config["command_timeout"],
            data_timeout=config["data_timeout"])


class Downstream:
    """One open connection to a next hop, greeted (and encrypted, and logged in) as configured.

    Every method raises DownstreamError when the connection fails; after that the object
    is closed and must be dropped.
    """

    def __init__(self, hop: Hop, options: ClientOptions) -> None:
        self.hop, self.options = hop, options
        self.smtp: smtplib.SMTP | None = None
        self.tls = False
        self.reusable = True  #: False once used for XCLIENT (Postfix allows one per session)
        self.idle_since = time.monotonic()
        self._authenticated = False

    # opening -----------------------------------------------------------------
    def open(self) -> Downstream:
        options, hop = self.options, self.hop
        smtp_class = smtplib.LMTP if options.lmtp else smtplib.SMTP
        with self._failures("connect"):
            # Host given to the constructor: smtplib keeps it as the TLS server name.
            smtp = smtp_class(hop.host, hop.port, local_hostname=options.helo or None,
                              timeout=options.connect_timeout)
            self.smtp = smtp
            smtp.sock.settimeout(options.command_timeout)
            if not hop.is_unix:
                # Commands and the final dot are small writes that wait for a reply: with
                # Nagle's algorithm each could sit out the peer's delayed ACK (~40 ms).
                smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hop.name:
                smtp._host = hop.name  # the TLS server name (SNI, certificate check), not the address
            self._hello()
            if options.starttls != "off" and not hop.is_unix and smtp.has_extn("starttls"):
                smtp.starttls(context=options.tls_context)
                self.tls = True
                problem = options.tls_check(hop, smtp.sock) if options.tls_check else None
                if problem:
                    raise DownstreamError(f"{hop.where}: {problem}")
                self._hello()
            elif options.starttls == "required":
                raise DownstreamError(f"{hop.where} does not offer STARTTLS (starttls = required)")
        return self

    def _hello(self) -> None:
        assert self.smtp is not None
        code, message = self.smtp.ehlo()
        if code != 250:
            raise DownstreamError(f"{self.hop.where} answers {'LHLO' if self.options.lmtp else 'EHLO'} "
                                  f"with {code} {_text(message)}")

    def _login(self) -> None:
        options = self.options
        if not options.auth_user or self._authenticated:
            return
        if not self.tls and not options.auth_without_tls:
            raise DownstreamError(f"{self.hop.where}: no TLS, so no AUTH (auth_without_tls = no)")
        assert self.smtp is not None
        try:
            self.smtp.login(options.auth_user, options.auth_password)
        except smtplib.SMTPAuthenticationError as error:
            self.close()
            raise DownstreamError(f"{self.hop.where} refused our AUTH as {options.auth_user}: "
                                  f"{error.smtp_code} {_text(error.smtp_error)}") from None
        except smtplib.SMTPNotSupportedError:
            self.close()
            raise DownstreamError(f"{self.hop.where} offers no AUTH (auth_user is set)") from None
        self._authenticated = True

    # one transaction -----------------------------------------------------------
    def reset(self) -> bool:
        """RSET before a reuse; False if the connection turned out dead (it is closed)."""
        try:
            with self._failures("RSET"):
                return self._command("RSET").ok or self._closed()
        except DownstreamError:
            return False

    def prepare(self, client: ClientFacts | None) -> None:
        """Before MAIL: tell who the client is (XCLIENT or XFORWARD, if offered), log in."""
        assert self.smtp is not None
        with self._failures("XCLIENT/XFORWARD"):
            for verb in self.options.forward_client if client is not None else ():
                offered = self.smtp.esmtp_features.get(verb)
                if offered is None:
                    continue
                assert client is not None
                names = set(offered.upper().split())
                values = {k: v for k, v in client.attributes(verb.upper()).items() if k in names}
                self._send_attributes(verb.upper(), values)
                break
        with self._failures("AUTH"):
            self._login()

    def _send_attributes(self, verb: str, values: dict[str, str]) -> None:
        # Postfix takes at most 512 octets a line: send the attributes in as many commands
        # as needed (both verbs accept that).
        parts, line = [], ""
        for name, value in values.items():
            item = f"{name}={xtext(value)}"
            if line and len(verb) + len(line) + len(item) + 4 > 500:
                parts.append(line)
                line = ""
            line = f"{line} {item}".strip()
        if line:
            parts.append(line)
        for part in parts:
            response = self._command(verb, part)
            if verb == "XCLIENT":
                # XCLIENT restarts the session: a new greeting (220), then EHLO again,
                # and (with Postfix) no second XCLIENT: this connection is not reusable.
                self.reusable = False
                self._authenticated = False
                if response.code != 220:
                    raise DownstreamError(f"{self.hop.where} refused XCLIENT: {response}")
                self._hello()
            elif not response.ok:
                raise DownstreamError(f"{self.hop.where} refused XFORWARD: {response}")

    def mail(self, sender: Address, size: int, recipients: Iterable[Address] = (),
             dsn: tuple[str | None, str | None] = (None, None), requiretls: bool = False) -> Response:
        """MAIL FROM, with SIZE, BODY=8BITMIME and SMTPUTF8 (any non-ASCII address) as offered,
        and ``dsn``'s RET and ENVID (RFC 3461) when the next hop offers DSN. A ``requiretls``
        message goes only over verified TLS to a hop that offers REQUIRETLS (RFC 8689 5),
        else it is refused here with 550 5.7.10, before anything is sent."""
        assert self.smtp is not None
        params = []
        if requiretls:
            problem = self._requiretls_problem()
            if problem:
                return Response(550, f"5.7.10 REQUIRETLS: {problem}")
            params.append("REQUIRETLS")
        ret, envid = dsn
        if self.smtp.has_extn("dsn"):  # RFC 3461 4: only to a hop that offers it
            params += [f"RET={ret}"] if ret else []
            params += [f"ENVID={xtext(envid)}"] if envid else []
        if self.smtp.has_extn("size") and size:
            params.append(f"SIZE={size}")
        if self.smtp.has_extn("8bitmime"):
            params.append("BODY=8BITMIME")  # declaring 8 bits is right for 7-bit content too
        needs_utf8 = not sender.is_ascii or not all(r.is_ascii for r in recipients)
        if needs_utf8:
            if not self.smtp.has_extn("smtputf8"):
                return Response(553, "5.6.7 the next hop does not support SMTPUTF8 addresses")
            params.append("SMTPUTF8")
        self.smtp.command_encoding = "utf-8" if needs_utf8 else "ascii"
        with self._failures("MAIL"):
            return self._command("MAIL", f"FROM:{sender.format()}{''.join(' ' + p for p in params)}")

    def _requiretls_problem(self) -> str | None:
        assert self.smtp is not None
        context = self.options.tls_context
        if not self.tls or context is None or context.verify_mode != ssl.CERT_REQUIRED:
            return f"{self.hop.where}: no verified TLS session"
        if not self.smtp.has_extn("requiretls"):
            return f"{self.hop.where} does not offer REQUIRETLS"
        return None

    def rcpt(self, recipient: Address) -> Response:
        assert self.smtp is not None
        if not recipient.is_ascii and self.smtp.command_encoding != "utf-8":
            return Response(553, "5.6.7 the next hop does not support SMTPUTF8 addresses")
        params = ""
        if self.smtp.has_extn("dsn"):
            params += f" NOTIFY={','.join(recipient.notify)}" if recipient.notify else ""
            if recipient.orcpt:
                addr_type, _, address = recipient.orcpt.partition(";")
                params += f" ORCPT={addr_type};{xtext(address)}"
        with self._failures("RCPT"):
            return self._command("RCPT", f"TO:{recipient.format()}{params}")

    def data(self, chunks: Iterable[bytes], replies: int) -> list[Response]:
        """DATA, the message, the final dot; one reply for SMTP, ``replies`` for LMTP."""
        assert self.smtp is not None
        smtp = self.smtp
        with self._failures("DATA"):
            response = self._command("DATA")
            if response.code != 354:
                return [response] * (replies if self.options.lmtp else 1)
            for block in dot_stuffed(chunks):
                smtp.sock.sendall(block)
            smtp.sock.settimeout(self.options.data_timeout)  # RFC 5321 4.5.3.2.6: 10 minutes
            results = [self._reply() for _ in range(replies if self.options.lmtp else 1)]
            smtp.sock.settimeout(self.options.command_timeout)
            return results

    def _command(self, verb: str, argument: str = "") -> Response:
        assert self.smtp is not None
        self.smtp.putcmd(verb, argument)
        return self._reply()

    def _reply(self) -> Response:
        assert self.smtp is not None
        code, message = self.smtp.getreply()
        if code == 421:  # RFC 5321 3.8: the server is closing the connection
            self.reusable = False
        return Response(code, _text(message))

    @contextmanager
    def _failures(self, step: str) -> Iterator[None]:
        try:
            yield
        except DownstreamError:
            self.close()
            raise
        except (OSError, smtplib.SMTPException, ssl.SSLError, ValueError) as error:
            self.close()
            raise DownstreamError(f"{self.hop.where} during {step}: {_describe(error)}") from None

    def _closed(self) -> bool:
        self.close()
        return False

    def close(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None

    def quit(self) -> None:
        """Say goodbye politely, without waiting long for the answer."""
        if self.smtp is None:
            return
        try:
            self.smtp.sock.settimeout(min(self.options.command_timeout, 5.0))
            self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass  # it was going away anyway; QUIT is a courtesy
        self.close()


# -- the pool ----------------------------------------------------------------------


class Pool:
    """Up to ``size`` connections per route, open at once; idle ones are kept for reuse.

    A new connection goes to the route's first server that answers (failover); an idle
    one is reused whichever server it leads to, until it dies or idles out.

    A reused connection is reset (RSET) first, which also proves it alive; a dead one is
    dropped and the next (or a new one) taken. Nothing per session lives here. When all
    ``size`` connections of a route are busy, a caller waits up to ``wait`` seconds.
    """

    def __init__(self, options: ClientOptions, size: int = 10, wait: float = 10.0,
                 idle_timeout: float = 60.0) -> None:
        self.options, self.size, self.wait, self.idle_timeout = options, size, wait, idle_timeout
        self._idle: dict[object, list[Downstream]] = {}
        self._slots: dict[object, BoundedSemaphore] = {}
        self.opened = 0  #: connections opened so far (for tests and logs)

    @contextmanager
    def connection(self, route: Route, key: object = None) -> Iterator[Downstream]:
        """A connection for ``route``; ``key`` (default: the route) names the destination whose
        ``size`` slots and idle connections it takes (the outbound queue: the recipient domain)."""
        key = route if key is None else (key, route)
        slots = self._slots.setdefault(key, BoundedSemaphore(self.size))
        if not slots.acquire(timeout=self.wait):
            raise DownstreamError(f"all {self.size} connections to {route.where} busy for {self.wait}s")
        downstream: Downstream | None = None
        try:
            downstream = self._reuse(key) or self._open(route)
            yield downstream
        except BaseException:
            if downstream is not None:
                downstream.close()  # in an unknown state: never reuse
                downstream = None
            raise
        finally:
            if downstream is not None:
                if downstream.reusable and downstream.smtp is not None:
                    downstream.idle_since = time.monotonic()
                    self._idle.setdefault(key, []).append(downstream)
                else:
                    downstream.quit()
            slots.release()

    def _open(self, route: Route) -> Downstream:
        """A new connection to the first of the route's servers that can be reached."""
        failures = []
        for hop in route.hops:
            self.opened += 1
            try:
                return Downstream(hop, self.options).open()
            except DownstreamError as error:
                failures.append(str(error))
        raise DownstreamError("; ".join(failures))

    def _reuse(self, key: object) -> Downstream | None:
        idle = self._idle.get(key, [])
        now = time.monotonic()
        for stale in [d for d in idle if now - d.idle_since > self.idle_timeout]:
            idle.remove(stale)
            stale.close()
        while idle:
            downstream = idle.pop()  # the most recently used is the likeliest alive
            if downstream.reset():
                return downstream
        return None

    def idle(self, route: Route) -> int:
        return len(self._idle.get(route, []))

    def close(self) -> None:
        for idle in self._idle.values():
            for downstream in idle:
                downstream.quit()
        self._idle.clear()


# -- a whole hand-off, and its verdict -----------------------------------------------


class Relay:
    """Routes, a pool, and the rules above: what the two plugins call from their hooks."""

    def __init__(self, config: dict[str, Any], lmtp: bool, logger: logging.Logger) -> None:
        self.lmtp = lmtp
        self.routes = parse_routes(config["routes"], 24 if lmtp else 25)
        if not lmtp and any(hop.is_unix for route in self.routes for hop in route.hops):
            raise ConfigurationError("unix socket routes are for LMTP (queue/lmtp)")
        self.options = ClientOptions.from_config(config, lmtp)
        self.pool = Pool(self.options, config["pool_size"], config["pool_wait"], config["idle_timeout"])
        self.callahead = config["callahead"]
        self.log = logger

    def route(self, recipient: Address) -> Route | None:
        # Bare <postmaster> and address literals have no domain to route by: they take "*".
        domain = recipient.host if recipient.host and not recipient.host.startswith("[") else "*"
        return route_for(self.routes, domain)

    # RCPT time ----------------------------------------------------------------
    def check_recipient(self, session: Any, recipient: Address) -> Any:
        """hook_rcpt: one route per transaction; with callahead, ask the next hop now."""
        self.options.helo = self.options.helo or session.me
        route = self.route(recipient)
        if route is None:
            return DENY, f"5.4.4 no route for {recipient.host or recipient.address}"
        transaction = session.transaction
        taken = {self.route(r) for r in transaction.recipients}
        if taken and route not in taken:
            return DENYSOFT, ("4.5.3 this recipient goes to another next hop than the ones "
                              "before it; send it in a separate transaction")
        if not self.callahead:
            return DECLINED
        sender = transaction.sender or Address.null()
        try:
            with self.pool.connection(route) as downstream:
                downstream.prepare(ClientFacts.of(session))
                response = downstream.mail(sender, 0, [recipient])
                if response.ok:
                    response = downstream.rcpt(recipient)
        except DownstreamError as error:
            self.log.warning("callahead for %s: %s", recipient.format(), error)
            return DENYSOFT, "4.4.1 cannot check this recipient with the next hop now, try again later"
        self.log.info("callahead %s: %s", recipient.format(), response)
        if response.ok:
            return DECLINED  # the next hop would take it; relaying rules are rcpt_ok's business
        return _refusal(response)

    # queue time ---------------------------------------------------------------
    def deliver(self, session: Any) -> Any:
        """hook_queue: hand the transaction over; OK only when the next hop has it."""
        self.options.helo = self.options.helo or session.me
        transaction = session.transaction
        sender = transaction.sender or Address.null()
        groups: dict[Route, list[Address]] = {}
        for recipient in transaction.recipients:
            route = self.route(recipient)
            if route is None:
                self.log.error("no route for %s (check routes)", recipient.format())
                return DENYSOFT, f"4.4.0 no route for {recipient.format()}, try again later"
            groups.setdefault(route, []).append(recipient)
        if len(groups) > 1:
            # check_recipient keeps this from happening; a plugin before us in the rcpt
            # chain accepted the recipients without asking us. See the docstring.
            self.log.warning("recipients span %d routes: put this plugin before rcpt_ok in [plugins]",
                             len(groups))
        size = transaction.data_size + 1000  # + our Received header, roughly
        client = ClientFacts.of(session)
        delivered: list[str] = []  # "next hop: its reply", for the log
        accepted: list[str] = []
        try:
            with ExitStack() as stack:
                ready = []
                for route, recipients in groups.items():
                    downstream = stack.enter_context(self.pool.connection(route))
                    downstream.prepare(client)
                    refusal = self._envelope(downstream, sender, recipients, size,
                                             (transaction.dsn_ret, transaction.dsn_envid),
                                             transaction.requiretls)
                    if refusal is not None:
                        return refusal
                    ready.append((route, downstream, recipients))
                for route, downstream, recipients in ready:
                    responses = downstream.data(transaction.message_chunks(), len(recipients))
                    verdict = self._after_data(route, recipients, responses, delivered)
                    if verdict[0] is not OK:
                        return verdict
                    delivered.append(f"{downstream.hop.where}: {responses[0].text}")
                    accepted.append(responses[0].text)
        except DownstreamError as error:
            self.log.warning("delivery failed: %s", error)
            if delivered:
                self.log.error("delivered to %s before that failure: the retry duplicates it there",
                               "; ".join(delivered))
            return DENYSOFT, "4.4.1 the next hop is not available, try again later"
        self.log.info("queued: %s", "; ".join(delivered))
        return OK, accepted[0] if len(accepted) == 1 else "2.0.0 Queued"

    def _envelope(self, downstream: Downstream, sender: Address, recipients: list[Address],
                  size: int, dsn: tuple[str | None, str | None], requiretls: bool = False) -> Any:
        """MAIL and every RCPT; None when all were accepted, else the verdict (after RSET)."""
        response = downstream.mail(sender, size, recipients, dsn, requiretls)
        if not response.ok:
            self.log.info("next hop refused MAIL %s: %s", sender.format(), response)
            downstream.reset()
            return _refusal(response)
        refused = []
        for recipient in recipients:
            response = downstream.rcpt(recipient)
            if not response.ok:
                self.log.info("next hop refused RCPT %s: %s", recipient.format(), response)
                refused.append((recipient, response))
        if not refused:
            return None
        downstream.reset()  # nothing was sent: leave the next hop clean for the next use
        return _combined(refused, len(recipients))

    def _after_data(self, route: Route, recipients: list[Address], responses: list[Response],
                    delivered: list[str]) -> Any:
        if all(r.ok for r in responses):
            return OK, responses[0].text
        if delivered:
            self.log.error("delivered to %s, then %s refused the DATA: the retry duplicates it",
                           "; ".join(delivered), route.where)
            first = next(r for r in responses if not r.ok)
            return DENYSOFT, f"4.3.0 partly delivered; {first.text}"
        if not self.lmtp:
            return _refusal(responses[0])
        refused = [(rcpt, r) for rcpt, r in zip(recipients, responses) if not r.ok]
        if len(refused) == len(recipients):
            return _combined(refused, len(recipients))
        accepted = [rcpt.format() for rcpt, r in zip(recipients, responses) if r.ok]
        self.log.warning("LMTP accepted %s and refused %s: answering 4xx, so the retry duplicates it "
                         "for the accepted ones (use callahead to refuse at RCPT time)",
                         ", ".join(accepted), "; ".join(f"{rcpt.format()}: {r}" for rcpt, r in refused))
        rcpt, response = refused[0]
        return DENYSOFT, f"4.3.0 not delivered to {rcpt.format()}: {_without_enhanced(response.text)}"


def _refusal(response: Response) -> Any:
    """The next hop's refusal, passed on: its text (enhanced code included), 5xx or 4xx."""
    return (DENY if response.permanent else DENYSOFT), response.text


def _combined(refused: list[tuple[Address, Response]], total: int) -> Any:
    """Some recipients refused and nothing delivered: 5xx only if all were, for good."""
    if len(refused) == total and all(r.permanent for _, r in refused):
        return DENY, refused[0][1].text
    recipient, response = refused[0]
    if len(refused) == total:
        temporary = next((r for _, r in refused if not r.permanent), response)
        return DENYSOFT, temporary.text
    return DENYSOFT, (f"4.3.0 {recipient.format()} was refused by the next hop "
                      f"({response.code} {_without_enhanced(response.text)}); try again later")


def _without_enhanced(text: str) -> str:
    return re.sub(r"^[245]\.\d{1,3}\.\d{1,3}\s+", "", text)


def _text(message: bytes | str) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return message.replace("\r", "")


def _describe(error: BaseException) -> str:
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {_text(error.smtp_error)}"
    if isinstance(error, socket.timeout):
        return "timed out"
    return str(error) or type(error).__name__


__all__ = ["CONFIGSPEC", "ClientFacts", "ClientOptions", "ConfigurationError", "Downstream",
           "DownstreamError", "Hop", "Pool", "Relay", "Response", "Route", "dot_stuffed", "parse_routes",
           "route_for", "xtext"]


class RelayPlugin(Plugin):
    """What queue/smtp_forward and queue/lmtp share: a ``Relay`` to the next hop.

    The plugin checks recipients with the next hop at RCPT (callahead) and delivers at
    queue; ``lmtp`` says which protocol. Its hook timeout defaults to the sum of its own
    network timeouts, so a slow next hop is waited for rather than cut off mid-reply.
    """

    configspec = CONFIGSPEC
    lmtp = False

    def setup(self) -> None:
        try:
            self.relay = Relay(self.config, lmtp=self.lmtp, logger=self.log)
        except ConfigurationError as error:
            raise ValueError(str(error)) from None
        if self.timeout is None:
            config = self.config
            self.timeout = config["connect_timeout"] + 8 * config["command_timeout"] + config["data_timeout"]

    def hook_rcpt(self, session: Any, recipient: Address, params: dict[str, Any]) -> Any:
        return self.relay.check_recipient(session, recipient)

    def hook_queue(self, session: Any) -> Any:
        return self.relay.deliver(session)
