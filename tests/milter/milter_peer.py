"""A TEST PEER, not a real milter: the filter side of the milter protocol on a real loopback
socket, scripted per test. It does what the Debian daemons cannot be made to do on demand:
change recipients, the sender and the body, discard, quarantine, send progress, hang, close,
or answer garbage at a chosen step. Its framing is written here, independently of
qpgevent.milter_protocol, so a bug there cannot hide in both sides."""

from __future__ import annotations

import socket
import struct
from typing import Any

import gevent
import gevent.event
from gevent.server import StreamServer

HANG, CLOSE = "hang", "close"
NO_REPLY = frozenset(b"DAQ")  # macros, abort, quit


def packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def header_change(code: bytes, index: int, name: str, value: str) -> bytes:
    return packet(code, struct.pack("!I", index) + name.encode() + b"\0" + value.encode() + b"\0")


class PeerMilter:
    """``answers`` maps a command letter ("C", "H", "M", "R", "T", "L", "N", "B", "E") to the
    packets to send back (a list of bytes), a callable (data -> that list), or HANG / CLOSE.
    Unlisted steps get "c" (continue), end of message "a" (accept). ``seen`` records every
    (connection number, command letter, data) it received."""

    def __init__(self, answers: dict[str, Any] | None = None, actions: int = 0x1FF, steps: int = 0,
                 unix_path: str | None = None) -> None:
        self.answers = answers or {}
        self.actions, self.steps = actions, steps
        self.seen: list[tuple[int, str, bytes]] = []
        self.connections = 0
        self.closed = 0
        self._release = gevent.event.Event()
        if unix_path:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(unix_path)
            listener.listen(16)
            self.server = StreamServer(listener, self._handle)
            self.address = f"unix:{unix_path}"
        else:
            self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        if not unix_path:
            self.port = self.server.server_port
            self.address = f"inet:127.0.0.1:{self.port}"

    def commands(self, letter: str) -> list[bytes]:
        return [data for _, code, data in self.seen if code == letter]

    def _handle(self, sock: Any, _: Any) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:  # bounded by the client: it ends with QUIT or closes
                head = self._read(sock, 5)
                if head is None:
                    return
                (length,) = struct.unpack("!I", head[:4])
                code = head[4:5].decode()
                data = self._read(sock, length - 1) if length > 1 else b""
                self.seen.append((number, code, data or b""))
                if code == "O":
                    sock.sendall(packet(b"O", struct.pack("!III", 6, self.actions, self.steps)))
                    continue
                if code == "Q":
                    return
                if ord(code) in NO_REPLY:
                    continue
                answer = self.answers.get(code, [packet(b"a" if code == "E" else b"c")])
                if callable(answer):
                    answer = answer(data)
                if answer == HANG:
                    self._release.wait(60)  # until the test ends: a filter stuck on a lock
                    return
                if answer == CLOSE:
                    return
                if answer is None:  # the step has NR_* set: no reply
                    continue
                for reply in answer:
                    sock.sendall(reply)
        except OSError:
            return
        finally:
            self.closed += 1
            sock.close()

    @staticmethod
    def _read(sock: Any, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def stop(self) -> None:
        self._release.set()
        self.server.stop(timeout=1)

    def __enter__(self) -> PeerMilter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


