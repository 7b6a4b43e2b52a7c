"""One SMTP or LMTP connection to a next hop: ``Downstream``, and what it speaks.

Owns the client session on smtplib (which gevent makes cooperative): greeting,
EHLO/LHLO, STARTTLS (with an optional DANE/MTA-STS check), AUTH, XCLIENT/XFORWARD,
one transaction with a reply per recipient, and DATA streamed from the spool and
dot-stuffed; with the values it trades in (``Response``, ``ClientFacts``,
``ClientOptions``). Every failure becomes ``DownstreamError``; what a reply means for the
client is ``smtp_client.Relay``'s business.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..core.address import Address
from ..core.dsn_request import mail_parameters, rcpt_parameters, xtext
from .mxroute import addresses_of
from .relay_routes import ConfigurationError, Hop

_EOL = re.compile(rb"\r\n|\n|\r")
#: Longest stretch without a line end held back while dot-stuffing (lines are shorter).
_STUFF_LIMIT = 1 << 16


class DownstreamError(Exception):
    """The next hop could not be reached or broke off; always temporary for our client."""


class TlsFailure(DownstreamError):
    """The next hop gave no TLS that was required: no STARTTLS, a failed handshake or
    certificate check, a DANE or MTA-STS check that failed. Temporary for most mail; a
    REQUIRETLS message fails on it (RFC 8689 4.2.1)."""


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
    #: A passing ``tls_check`` verified the certificate (DANE): TLS counts as verified
    #: for REQUIRETLS although ``tls_context`` checks nothing.
    tls_check_verifies: bool = False
    #: Told of a STARTTLS that failed (the exception), or was required and not offered
    #: (None): what TLS-RPT counts besides ``tls_check``'s verdicts.
    tls_failed: Callable[[Hop, Exception | None], None] | None = None

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
            smtp = self._connect(smtp_class)
            self.smtp = smtp
            smtp.sock.settimeout(options.command_timeout)
            if not hop.is_unix:
                # Commands and the final dot are small writes that wait for a reply: with
                # Nagle's algorithm each could sit out the peer's delayed ACK (~40 ms).
                smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The TLS server name (SNI, certificate check): the name, never the address dialled.
            smtp._host = hop.name or hop.host
            self._hello()
            if options.starttls != "off" and not hop.is_unix and smtp.has_extn("starttls"):
                try:
                    smtp.starttls(context=options.tls_context)
                except (OSError, smtplib.SMTPException, ValueError) as error:
                    if options.tls_failed:
                        options.tls_failed(hop, error)
                    if isinstance(error, ssl.SSLError):  # the handshake, or the certificate check
                        raise TlsFailure(f"{hop.where} during STARTTLS: {_describe(error)}") from None
                    raise
                self.tls = True
                problem = options.tls_check(hop, smtp.sock) if options.tls_check else None
                if problem:
                    raise TlsFailure(f"{hop.where}: {problem}")
                self._hello()
            elif options.starttls == "required":
                if options.tls_failed:
                    options.tls_failed(hop, None)
                raise TlsFailure(f"{hop.where} does not offer STARTTLS (starttls = required)")
        return self

    def _connect(self, smtp_class: type[smtplib.SMTP]) -> smtplib.SMTP:
        """Connected and greeted: each address of the hop in turn, until one answers."""
        *others, last = addresses_of(self.hop.host)
        for address in others:
            try:
                return self._dial(smtp_class, address)
            except OSError:
                continue
        return self._dial(smtp_class, last)

    def _dial(self, smtp_class: type[smtplib.SMTP], address: str) -> smtplib.SMTP:
        return smtp_class(address, self.hop.port, local_hostname=self.options.helo or None,
                          timeout=self.options.connect_timeout)

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
        if self.smtp.has_extn("dsn"):  # RFC 3461 4: only to a hop that offers it
            params += mail_parameters(*dsn)
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
        verified = context is not None and (context.verify_mode == ssl.CERT_REQUIRED or
                                            self.options.tls_check_verifies)
        if not self.tls or not verified:
            return f"{self.hop.where}: no verified TLS session"
        if not self.smtp.has_extn("requiretls"):
            return f"{self.hop.where} does not offer REQUIRETLS"
        return None

    def rcpt(self, recipient: Address) -> Response:
        assert self.smtp is not None
        if not recipient.is_ascii and self.smtp.command_encoding != "utf-8":
            return Response(553, "5.6.7 the next hop does not support SMTPUTF8 addresses")
        params = rcpt_parameters(recipient.notify, recipient.orcpt) if self.offers_dsn else []
        with self._failures("RCPT"):
            return self._command("RCPT", f"TO:{recipient.format()}{''.join(' ' + p for p in params)}")

    @property
    def offers_dsn(self) -> bool:
        """The next hop takes the DSN request on (RFC 3461): it said DSN to our EHLO."""
        return self.smtp is not None and bool(self.smtp.has_extn("dsn"))

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


__all__ = ["ClientFacts", "ClientOptions", "Downstream", "DownstreamError", "Response", "TlsFailure", "dot_stuffed",
           "xtext"]
