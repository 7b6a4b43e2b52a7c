"""Byte framing of SMTP input: command lines, and the DATA stream up to its final dot.

Pure functions over bytes; no sockets. The rules that keep SMTP smuggling out:

- Only CRLF ends a line (RFC 5321 2.3.8). A bare LF or bare CR inside DATA is message
  content at most, never a line end, so ``\\n.\\n``, ``\\r.\\r\\n`` or ``\\n.\\r\\n`` can never
  end a message early and split one submission into two. By default a message that holds
  one is refused whole after its real end (``CRLF.CRLF``).
- Lines have a length limit (512 octets for commands, 4.5.3.1.4; 1000 for text,
  4.5.3.1.6). Over it, the line is dropped or the message marked, and the buffer never
  grows past the limit, so a hostile client cannot make us buffer without end.
- NUL octets are not message text (RFC 5322 4.1, RFC 2045 2.8): by default the message
  is marked and refused after its end; ``nul_bytes="strip"`` drops them, ``"accept"``
  keeps them. One ``in`` test (memchr) per piece when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass

CRLF = b"\r\n"
NUL_BYTES = ("reject", "strip", "accept")  #: what DataReader does with NUL octets


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A command line went past the limit; it has been thrown away up to its end."""


@dataclass(frozen=True, slots=True)
class BareLineEnding:
    """A command line ended with a bare LF (or held a bare CR)."""


class CommandFramer:
    """Cuts command lines out of a byte buffer, CRLF-terminated and length-limited."""

    __slots__ = ("max_line", "buffer", "_discarding")  # one per session

    def __init__(self, max_line: int = 512) -> None:
        self.max_line = max_line  #: octets, CRLF included (RFC 5321 4.5.3.1.4)
        self.buffer = bytearray()
        self._discarding = False  # inside an over-long line, waiting for its end

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def take_rest(self) -> bytes:
        """Hand over everything buffered (when the stream switches to DATA)."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest

    def next_line(self) -> bytes | LineTooLong | BareLineEnding | None:
        """The next complete line without its CRLF, a framing error, or None for 'need more'."""
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) >= self.max_line:
                    # Drop what we have and the rest of the line when it comes; report once.
                    self.buffer.clear()
                    if not self._discarding:
                        self._discarding = True
                        return LineTooLong()
                return None
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self.max_line:
                return LineTooLong()
            if not line.endswith(CRLF) or b"\r" in line[:-2]:
                return BareLineEnding()
            return line[:-2]


@dataclass(slots=True)
class DataProblems:
    """What was wrong with a message, found while it streamed in."""

    too_big: bool = False
    line_too_long: bool = False
    bare_line_ending: bool = False
    nul_byte: bool = False


class DataReader:
    """Turns the raw DATA stream into message bytes: dot-unstuffed, CRLF kept, end found.

    ``feed(data)`` returns ``(message_bytes, rest)``; ``rest`` is None while the message
    goes on, or the bytes that followed the final ``.CRLF`` (pipelined commands) once it
    has ended. Message bytes past ``max_size`` are counted but not returned.
    """

    def __init__(self, max_size: int, max_line: int = 1000, allow_bare_lf: bool = False,
                 nul_bytes: str = "reject") -> None:
        if nul_bytes not in NUL_BYTES:
            raise ValueError(f"nul_bytes must be one of {', '.join(NUL_BYTES)}")
        self.max_size = max_size  #: 0 means no limit
        self.max_line = max_line  #: octets, CRLF included (RFC 5321 4.5.3.1.6)
        self.allow_bare_lf = allow_bare_lf
        self.nul_bytes = nul_bytes
        self.size = 0  #: octets of message after unstuffing, whether kept or not
        self.problems = DataProblems()
        self._partial = b""  # start of a line whose CRLF has not come yet
        self._mid_line = False  # _partial is not at a line start (a long line was flushed)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        buf = self._partial + data
        end = buf.rfind(CRLF)
        if end < 0:
            return self._keep(self._hold(buf)), None  # a long line counts toward max_size too
        region, self._partial = buf[:end + 2], buf[end + 2:]
        lines = region.split(CRLF)[:-1]
        out: list[bytes] = []
        rest: bytes | None = None
        starts_with_dot = region.startswith(b".") and not self._mid_line
        dot_line = -1 if starts_with_dot else region.find(b"\r\n.")
        if starts_with_dot or dot_line >= 0:
            # A line starts with a dot (stuffed, or the end marker: once per message).
            # The lines before the first such line stay as they are, in one piece.
            first = dot_line + 2 if dot_line >= 0 else 0
            head, tail = region[:first], region[first:].split(CRLF)[:-1]
            unstuffed = []
            for i, line in enumerate(tail):
                if line == b".":
                    rest = CRLF.join(tail[i + 1:]) + (CRLF if i + 1 < len(tail) else b"")
                    rest += self._partial
                    self._partial = b""
                    break
                if line.startswith(b"."):
                    line = line[1:]  # RFC 5321 4.5.2: remove the doubled leading dot
                unstuffed.append(line)
            body = head + b"".join(line + CRLF for line in unstuffed)
            lines = lines[:len(lines) - len(tail)] + unstuffed
        else:
            body = region
        self._mid_line = False
        self._check(body, lines)
        out.append(body)
        if rest is None:
            out.append(self._hold(b""))
        return self._keep(b"".join(out)), rest

    def _hold(self, buf: bytes) -> bytes:
        """Keep an incomplete line, unless it is already too long to be legal."""
        if buf:
            self._partial = buf
        if len(self._partial) <= self.max_line:
            return b""
        # Too long to hold: flush all but a possible trailing CR (half of a CRLF).
        self.problems.line_too_long = True
        flush, self._partial = self._partial, b""
        if flush.endswith(b"\r"):
            flush, self._partial = flush[:-1], b"\r"
        if not self._mid_line and flush.startswith(b"."):
            flush = flush[1:]
        self._mid_line = True
        self._check_bare(flush)
        self.size += len(flush)
        return flush

    def _check(self, body: bytes, lines: list[bytes]) -> None:
        self.size += len(body)
        if lines and max(map(len, lines)) + 2 > self.max_line:
            self.problems.line_too_long = True
        self._check_bare(body, len(lines))  # ``body`` is ``lines``, each ended by its CRLF

    def _check_bare(self, chunk: bytes, crlf: int | None = None) -> None:
        if crlf is None:
            crlf = chunk.count(CRLF)
        if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
            if not self.allow_bare_lf:
                self.problems.bare_line_ending = True

    def _keep(self, chunk: bytes) -> bytes:
        if self.max_size and self.size > self.max_size:
            self.problems.too_big = True
            return b""
        if self.problems.nul_byte:
            return b""  # refused: keep nothing more
        if b"\0" in chunk and self.nul_bytes != "accept":
            if self.nul_bytes == "strip":
                return chunk.replace(b"\0", b"")
            self.problems.nul_byte = True
            return b""  # refused at the end: nothing of it is kept
        return chunk
