"""The ident query (RFC 1413): which user on the client's host owns its SMTP connection.

``lookup`` connects to the ident service of the client's host (port 113) from our side
of the SMTP connection's address, asks ``<client port> , <our port>`` and parses the one
line that comes back::

    <client port> , <our port> : USERID : <opsys>[,<charset>] : <user id>
    <client port> , <our port> : ERROR : <error type>

It gives the user id, or None on anything else: an ERROR reply, ports that do not match
the question, a malformed or over-long line, a refused connection, silence past the
timeout. The answer is the client host's word, not a proof (RFC 1413 6): use it for
logs and the Received header, never for access control. The socket calls block the
greenlet only (gevent's monkey-patching).
"""

from __future__ import annotations

import logging
import socket
import time

from ..connection import host_port

__all__ = ["lookup", "parse_reply", "IDENT_PORT"]

log = logging.getLogger("qpgevent.ident")

IDENT_PORT = 113
#: RFC 1413: "the user identifier ... MUST be less than 512 octets"; a reply line is
#: ports, type, opsys and that: anything longer than this is not an ident reply.
MAX_REPLY = 1024


def lookup(remote_ip: str, remote_port: int, local_ip: str, local_port: int,
           timeout: float = 2.0, port: int = IDENT_PORT) -> str | None:
    """The user id the client's ident service gives for this connection, or None."""
    deadline = time.monotonic() + timeout
    question = f"{remote_port} , {local_port}\r\n".encode("ascii")
    source = (local_ip, 0) if local_ip else None
    try:
        # From our SMTP address, so that a multi-homed client's ident sees the right pair.
        with socket.create_connection((remote_ip, port), timeout, source_address=source) as sock:
            sock.settimeout(_left(deadline))
            sock.sendall(question)
            line = _read_line(sock, deadline)
    except (OSError, ValueError) as error:
        log.debug("ident %s: %s", host_port(remote_ip, port), error)
        return None
    if line is None:
        log.debug("ident %s: no complete reply line", host_port(remote_ip, port))
        return None
    user = parse_reply(line, remote_port, local_port)
    if user is None:
        log.debug("ident %s: no user id in %r", host_port(remote_ip, port), line[:100])
    return user


def parse_reply(line: bytes, remote_port: int, local_port: int) -> str | None:
    """The user id of a USERID reply to the question (``remote_port``, ``local_port``), else None."""
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        # RFC 1413 allows other charsets for the user id only; the rest is US-ASCII.
        text = line.decode("utf-8", "replace").rstrip("\r\n")
    parts = text.split(":", 3)  # the user id, last, may itself hold colons
    if len(parts) != 4:
        return None
    ports, kind, opsys, user = parts
    if kind.strip().upper() != "USERID" or not opsys.strip():
        return None
    if _ports(ports) != (remote_port, local_port):
        return None
    # Spaces around tokens are allowed (RFC 1413 "Format of Responses"); none inside the id.
    user = user.strip(" \t")
    if not user or len(user.encode("utf-8")) >= 512 or not user.isprintable():
        return None
    return user


def _ports(text: str) -> tuple[int, int] | None:
    first, comma, second = text.partition(",")
    first, second = first.strip(), second.strip()
    if not comma or not first.isdigit() or not second.isdigit():
        return None
    return int(first), int(second)


def _read_line(sock: socket.socket, deadline: float) -> bytes | None:
    data = b""
    while b"\n" not in data and len(data) <= MAX_REPLY:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(MAX_REPLY + 1 - len(data))
        if not chunk:
            break
        data += chunk
    # A reply ends with CRLF; one that ends with the connection closing is taken as well.
    line = data.partition(b"\n")[0]
    return line if line and len(line) <= MAX_REPLY else None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("ident timeout")
    return left
