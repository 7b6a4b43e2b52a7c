"""The Transaction plugins see: one message from MAIL to the end of DATA (or RSET).

Mirrors qpsmtpd's ``Qpsmtpd::Transaction``: sender, recipients, header, body, notes; and
``results``, what each check concluded about this message (``qpgevent.results``).
The body is kept in memory up to ``size_threshold`` octets and spilled to a file in the
spool directory past it, so a 50 MiB message never sits in memory. Message bytes are
stored exactly as received after dot-unstuffing, CRLF line endings included.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .core.address import Address
from .core.headers import CRLF, Headers, is_continuation, is_field_start
from .results import Results

_ids = itertools.count(1)
#: A header block larger than this is not parsed as one: the rest counts as body.
MAX_HEADER_BYTES = 1 << 20


class Spool:
    """Bytes written once, read many times: memory first, a temporary file past a threshold."""

    def __init__(self, directory: str | None, threshold: int) -> None:
        self.directory = directory
        self.threshold = threshold
        self.size = 0
        self._memory = bytearray()
        self._file: Any = None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._memory += data
        if len(self._memory) > self.threshold:
            self._spill()

    def _spill(self) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix="body-", dir=self.directory)
        self._file.write(self._memory)
        self._memory = bytearray()

    def filename(self) -> str:
        """A path holding the bytes (spills to disk first), for tools that want a file."""
        if self._file is None:
            self._spill()
        self._file.flush()
        return str(self._file.name)

    def chunks(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """Read everything from the start; independent readers do not disturb each other."""
        if self._file is None:
            yield from (bytes(self._memory[i:i + chunk_size])
                        for i in range(0, len(self._memory), chunk_size))
            return
        self._file.flush()
        fd, offset = self._file.fileno(), 0
        while offset < self.size:
            chunk = os.pread(fd, min(chunk_size, self.size - offset), offset)
            if not chunk:
                break
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # NamedTemporaryFile: closing deletes it
            self._file = None
        self._memory = bytearray()


class Transaction:
    """One message's envelope and content, plus ``notes`` that last as long as it does."""

    def __init__(self, spool_dir: str | None = None, size_threshold: int = 1 << 20,
                 connection_id: str | None = None) -> None:
        #: Under its connection's id ("1f2a.7" -> "1f2a.7.3"): a grep for the connection finds
        #: its transactions too. The counter is the process's, so ids never repeat within it.
        self.id = f"{connection_id or format(os.getpid(), 'x')}.{next(_ids):x}"
        self.started = time.time()
        self.sender: Address | None = None
        self.recipients: list[Address] = []
        self.notes: dict[str, Any] = {}
        #: Each check's verdict about this message (pass/fail/skip/err and evidence), by plugin.
        self.results = Results()
        self.headers = Headers()
        self.headers_complete = False
        self.data_size = 0  #: octets of message received (after dot-unstuffing)
        self._separator = b""  # the empty line between header and body, when there was one
        self._header_buffer = bytearray()
        self._body = Spool(spool_dir, size_threshold)

    # -- envelope ----------------------------------------------------------
    def add_recipient(self, recipient: Address) -> None:
        self.recipients.append(recipient)

    def remove_recipient(self, recipient: Address) -> None:
        self.recipients = [r for r in self.recipients if r != recipient]

    # -- content, as it streams in -----------------------------------------
    def write(self, data: bytes) -> bool:
        """Append message bytes; True when this piece completed the header."""
        self.data_size += len(data)
        if self.headers_complete:
            self._body.write(data)
            return False
        self._header_buffer += data
        return self._scan_header()

    def end_of_data(self) -> bool:
        """The message is complete; True if that also completed the header."""
        if self.headers_complete:
            return False
        self._finish_header(len(self._header_buffer))
        return True

    def _scan_header(self) -> bool:
        buf, start = self._header_buffer, 0
        while True:
            end = buf.find(CRLF, start)
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._finish_header(start)
                    return True
                return False
            line = bytes(buf[start:end])
            if line == b"":
                self._separator = CRLF
                self._finish_header(start, end + 2)
                return True
            if not (is_field_start(line) or (start > 0 and is_continuation(line))):
                self._finish_header(start)  # not a header line: the body starts here
                return True
            start = end + 2

    def _finish_header(self, header_end: int, body_start: int | None = None) -> None:
        block = bytes(self._header_buffer[:header_end])
        body = bytes(self._header_buffer[header_end if body_start is None else body_start:])
        self._header_buffer = bytearray()
        self.headers = Headers.parse(block) if block else Headers()
        self.headers_complete = True
        if body:
            self._body.write(body)

    # -- reading it back ---------------------------------------------------
    @property
    def body_size(self) -> int:
        return self._body.size

    def body_chunks(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The body (after the header and its empty line), from the start, each call anew."""
        return self._body.chunks(chunk_size)

    def message_chunks(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """The whole message as it is now: edited header, separator, body."""
        yield self.headers.as_bytes() + self._separator
        yield from self._body.chunks(chunk_size)

    def new_body(self) -> Spool:
        """An empty body to write a replacement into (spooled like the original)."""
        return Spool(self._body.directory, self._body.threshold)

    def replace_body(self, body: Spool) -> None:
        """Swap the body for ``body`` (from ``new_body``); the header stays as it is."""
        self._body.close()
        self._body = body
        if body.size:
            self._separator = CRLF
        self.data_size = len(self.headers.as_bytes()) + len(self._separator) + body.size

    def body_filename(self) -> str:
        """A file holding the body, for scanners that want a path."""
        return self._body.filename()

    def close(self) -> None:
        """Drop the spooled content (the transaction is over)."""
        self._body.close()
