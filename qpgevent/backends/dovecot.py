"""A client of Dovecot's auth service: check a password (client protocol), look a user up (master).

Each call opens its own connection to the socket (``/path/to/auth-client``, or
``host:port`` of an ``inet_listener``), does the handshake and one request, and closes:
a handshake costs one round trip on loopback, and a connection that is never shared
between greenlets cannot mix two sessions' replies. The whole call runs under
``timeout`` seconds; a refused connection, a timeout, a line the protocol does not allow,
or Dovecot's own ``temp_fail`` raise ``directory.Unavailable``. The wire format lives in
``dovecot_protocol``; this module only moves its lines. ``SaslRelay`` is the exception to
one request per call: an exchange whose challenges Dovecot makes, kept open across the
client's steps.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..core import dovecot_protocol as protocol
from .directory import Unavailable
from .scanner import connect, scan_deadline

__all__ = ["AuthResult", "SaslRelay", "authenticate", "lookup", "mechanisms"]


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    mechanism: str  #: the mechanism used towards Dovecot
    fields: dict[str, str]


class _Lines:
    """LF-terminated lines from a socket, each at most ``protocol.MAX_LINE`` octets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, bytearray()

    def next(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > protocol.MAX_LINE:
                raise protocol.ProtocolError(f"line longer than {protocol.MAX_LINE} octets")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise protocol.ProtocolError("Dovecot closed the connection")
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer[:] = rest
        return line


def authenticate(address: str, timeout: float, user: str, password: str, *, remote_ip: str = "",
                 local_ip: str = "", secured: bool = False, service: str = "smtp") -> AuthResult:
    """Ask Dovecot whether ``password`` is ``user``'s, by PLAIN if it offers it, else LOGIN.

    A NUL in either is refused without asking: PLAIN separates its fields with NUL, so
    it would move the boundaries (AUTH LOGIN from the client can carry one).
    """
    if "\0" in user or "\0" in password:
        return AuthResult(False, "", {})
    with scan_deadline(timeout, f"Dovecot auth at {address}"), connect(address, timeout) as sock:
        try:
            return _authenticate(sock, user, password, remote_ip, local_ip, secured, service)
        except protocol.ProtocolError as error:
            raise Unavailable(f"Dovecot auth at {address}: {error}") from None


def _handshake(sock: socket.socket) -> tuple[_Lines, protocol.ClientHandshake]:
    lines = _Lines(sock)
    sock.sendall(protocol.client_hello(os.getpid()))
    handshake = protocol.ClientHandshake()
    while not handshake.feed(lines.next()):
        pass  # bounded: every line is read under the call's deadline
    return lines, handshake


def mechanisms(address: str, timeout: float) -> tuple[str, ...]:
    """The mechanisms Dovecot offers (the ``MECH`` lines of its handshake), in its order."""
    with scan_deadline(timeout, f"Dovecot auth at {address}"), connect(address, timeout) as sock:
        try:
            return tuple(_handshake(sock)[1].mechanisms)
        except protocol.ProtocolError as error:
            raise Unavailable(f"Dovecot auth at {address}: {error}") from None


class SaslRelay:
    """One client's SASL exchange passed through to Dovecot, step by step: Dovecot makes the
    challenges (CRAM-MD5, SCRAM-*), we carry them. The connection stays open between the
    steps (the client answers in its own time) and is this exchange's alone; ``close`` it.
    Each step runs under ``timeout``; errors and ``temp_fail`` raise ``Unavailable``."""

    def __init__(self, address: str, timeout: float, mechanism: str, *, remote_ip: str = "",
                 local_ip: str = "", secured: bool = False, service: str = "smtp") -> None:
        self.address, self.timeout, self.mechanism = address, timeout, mechanism
        self.service, self.secured, self.remote_ip, self.local_ip = service, secured, remote_ip, local_ip
        self._sock: socket.socket | None = None
        self._lines: _Lines | None = None

    def start(self, initial: bytes | None) -> protocol.AuthReply:
        """Connect, check Dovecot offers the mechanism, send ``AUTH``: its first reply."""
        def begin() -> None:
            self._sock = connect(self.address, self.timeout)
            self._lines, handshake = _handshake(self._sock)
            if self.mechanism not in handshake.mechanisms:
                raise protocol.ProtocolError(f"does not offer {self.mechanism}")
            self._sock.sendall(protocol.auth_request(1, self.mechanism, initial=initial, service=self.service,
                                                     secured=self.secured, remote_ip=self.remote_ip,
                                                     local_ip=self.local_ip))
        return self._exchange(begin)

    def step(self, data: bytes) -> protocol.AuthReply:
        """The client's answer to a ``CONT``: Dovecot's next reply."""
        def answer() -> None:
            if self._sock is None:
                raise protocol.ProtocolError("no exchange in progress")
            self._sock.sendall(protocol.continue_request(1, data))
        return self._exchange(answer)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = self._lines = None

    def _exchange(self, send: Callable[[], None]) -> protocol.AuthReply:
        try:
            with scan_deadline(self.timeout, f"Dovecot auth at {self.address}"):
                send()
                assert self._lines is not None
                reply = protocol.parse_auth_reply(self._lines.next(), 1)
        except protocol.ProtocolError as error:
            self.close()
            raise Unavailable(f"Dovecot auth at {self.address}: {error}") from None
        except BaseException:
            self.close()
            raise
        if reply.kind != "CONT":
            self.close()
        if reply.kind == "FAIL" and reply.temporary:
            raise Unavailable(f"Dovecot could not check: {reply.fields.get('reason', 'temp_fail')}")
        return reply


def _authenticate(sock: socket.socket, user: str, password: str, remote_ip: str, local_ip: str,
                  secured: bool, service: str) -> AuthResult:
    lines, handshake = _handshake(sock)
    if "PLAIN" in handshake.mechanisms:
        mechanism = "PLAIN"
        initial: bytes | None = b"\0" + user.encode() + b"\0" + password.encode()
        answers = []
    elif "LOGIN" in handshake.mechanisms:
        mechanism, initial, answers = "LOGIN", None, [user.encode(), password.encode()]
    else:
        raise protocol.ProtocolError(f"offers neither PLAIN nor LOGIN ({', '.join(handshake.mechanisms)})")
    # The client's address goes along (rip), so Dovecot's own per-address penalty and
    # its log see the real client, not us.
    sock.sendall(protocol.auth_request(1, mechanism, service=service, secured=secured,
                                       remote_ip=remote_ip, local_ip=local_ip, initial=initial))
    while True:
        reply = protocol.parse_auth_reply(lines.next(), 1)
        if reply.kind != "CONT":
            break
        if not answers:
            raise protocol.ProtocolError(f"{mechanism}: more challenges than the mechanism has")
        sock.sendall(protocol.continue_request(1, answers.pop(0)))
    if reply.kind == "FAIL" and reply.temporary:
        raise Unavailable(f"Dovecot could not check: {reply.fields.get('reason', 'temp_fail')}")
    return AuthResult(reply.kind == "OK", mechanism, reply.fields)


def lookup(address: str, timeout: float, user: str, kind: str = "USER",
           service: str = "smtp") -> protocol.LookupReply | None:
    """``USER`` (userdb) or ``PASS`` (passdb) lookup on the master socket: the reply, None if unknown.

    A name with a NUL is unknown without asking (the protocol cannot carry it).
    """
    if "\0" in user:
        return None
    with scan_deadline(timeout, f"Dovecot userdb at {address}"), connect(address, timeout) as sock:
        try:
            lines = _Lines(sock)
            sock.sendall(protocol.master_hello() + protocol.lookup_request(1, kind, user, service))
            handshake = protocol.MasterHandshake()
            while not handshake.feed(lines.next()):
                pass
            reply = protocol.parse_lookup_reply(lines.next(), 1)
        except protocol.ProtocolError as error:
            raise Unavailable(f"Dovecot userdb at {address}: {error}") from None
    if reply.failed:
        raise Unavailable(f"Dovecot userdb lookup failed: {reply.fields.get('reason', 'FAIL')}")
    return reply if reply.found else None
