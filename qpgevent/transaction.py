"""The Transaction plugins see: one message from MAIL to the end of DATA (or RSET).

Mirrors qpsmtpd's ``Qpsmtpd::Transaction``: sender, recipients, header, body, notes; and
``results``, what each check concluded about this message (``qpgevent.results``).
The body is kept in memory up to ``size_threshold`` octets and spilled to a file in the
spool directory past it, so a 50 MiB message never sits in memory. Message bytes are
stored exactly as received after dot-unstuffing, CRLF line endings included.

When the spill file cannot be written (``spool_dir`` full: ENOSPC, EDQUOT, EFBIG; or
any other OSError), the rest of the message is counted and dropped, ``problem`` says
``452 4.3.1`` (451 for other errors) and the session refuses the message at its end: a
clean temporary refusal, no traceback, and the session goes on.

A spilled body is a file ``body-<pid>-<random>`` in the spool directory, deleted when the
transaction ends; a worker killed mid-DATA cannot delete its own, so the master removes
them (``remove_spill_files``): every one at start, a dead worker's when it reaps it.

The header is found as the message streams in, incrementally: each octet is looked at
once however small the pieces it comes in (a header sent in 1 KiB pieces used to be
rescanned from its start on every piece: quadratic). A header longer than
``max_header_size`` ends there; ``header_too_large`` says so, and the session refuses the
message. A message that comes with more ``Received:`` headers than ``max_received``
has looped (or will): ``problem`` says ``554 5.4.6`` and it is refused at its end.
"""

from __future__ import annotations

import errno
import glob
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from .core.address import Address
from .core.headers import CRLF, Headers, is_continuation, is_field_start
from .core.reply import Canned, Reply, reply
from .results import Results

log = logging.getLogger("qpgevent.transaction")
_ids = itertools.count(1)
SPILL_PREFIX = "body-"
#: Errors that mean "no room": the client may try later, or elsewhere (RFC 3463 X.3.1).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
STORAGE_FULL = reply(452, "4.3.1", "Insufficient system storage, try again later")
CANNOT_STORE = reply(451, "4.3.0", "Cannot store the message right now, try again later")
#: More Received headers than ``[limits] max_received``: a mail loop (RFC 5321 6.3, RFC 3463 5.4.6).
TOO_MANY_HOPS = reply(554, "5.4.6", "Too many hops: a mail loop?")
MAX_RECEIVED = 100  #: the default ``[limits] max_received`` (Postfix's hopcount_limit)
#: The default ``[limits] max_header_size`` (Postfix's header_size_limit).
MAX_HEADER_BYTES = 102400


class Spool:
    """Bytes written once, read many times: memory first, a temporary file past a threshold."""

    def __init__(self, directory: str | None, threshold: int) -> None:
        self.directory = directory
        self.threshold = threshold
        self.size = 0
        self._memory = bytearray()
        self._file: Any = None
        self.error: OSError | None = None  #: why the bytes could not be kept: the rest is dropped

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.error is not None:
            return
        try:
            if self._file is not None:
                self._file.write(data)
                return
            self._memory += data
            if len(self._memory) > self.threshold:
                self._spill()
        except OSError as error:
            self._failed(error)

    def finish(self) -> None:
        """All is written: flush, so that a full disk shows now (``error``), not to a reader."""
        if self._file is not None and self.error is None:
            try:
                self._file.flush()
            except OSError as error:
                self._failed(error)

    def _failed(self, error: OSError) -> None:
        log.warning("cannot spill the message body to %s: %s", self.directory, error)
        self.error = error
        self.close()

    def _spill(self) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=self.directory)
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
            file, self._file = self._file, None
            try:
                file.close()  # NamedTemporaryFile: closing deletes it
            except OSError:  # its buffer could not be flushed (disk full): deleted all the same
                pass
        self._memory = bytearray()


def remove_spill_files(directory: str, pid: int | None = None) -> int:
    """Delete the spilled bodies process ``pid`` left in ``directory`` (every one when
    None: at start, when no session is alive); how many. Never raises."""
    pattern = f"{SPILL_PREFIX}{pid}-*" if pid is not None else f"{SPILL_PREFIX}*"
    removed = 0
    try:
        paths = glob.glob(os.path.join(glob.escape(directory), pattern))
    except OSError as error:  # out of file descriptors, say: next time
        log.warning("cannot list %s for spilled message bodies: %s", directory, error)
        return 0
    for path in paths:
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot remove the spilled message body %s: %s", path, error)
    return removed


class Transaction:
    """One message's envelope and content, plus ``notes`` that last as long as it does."""

    def __init__(self, spool_dir: str | None = None, size_threshold: int = 1 << 20,
                 connection_id: str | None = None, max_header_size: int = MAX_HEADER_BYTES,
                 max_received: int = MAX_RECEIVED) -> None:
        #: Under its connection's id ("1f2a.7" -> "1f2a.7.3"): a grep for the connection finds
        #: its transactions too. The counter is the process's, so ids never repeat within it.
        self.id = f"{connection_id or format(os.getpid(), 'x')}.{next(_ids):x}"
        self.started = time.time()
        self.sender: Address | None = None
        self.recipients: list[Address] = []
        #: DSN (RFC 3461 4.3, 4.4) from MAIL: RET ("FULL"/"HDRS") and ENVID decoded, or None.
        self.dsn_ret: str | None = None
        self.dsn_envid: str | None = None
        #: RFC 8689 REQUIRETLS on MAIL: pass the message on only over verified TLS.
        self.requiretls = False
        self.notes: dict[str, Any] = {}
        #: Each check's verdict about this message (pass/fail/skip/err and evidence), by plugin.
        self.results = Results()
        self.headers = Headers()
        self.headers_complete = False
        self.max_header_size = max_header_size
        self.max_received = max_received  #: Received headers a message may come with (0: any number)
        self.header_too_large = False  #: the header went past max_header_size
        self.data_size = 0  #: octets of message received (after dot-unstuffing)
        self._separator = b""  # the empty line between header and body, when there was one
        self._header_buffer = bytearray()
        self._line_start = 0  # in _header_buffer: the first line not yet judged
        self._searched = 0  # in _header_buffer: no CRLF starts before here
        self._body = Spool(spool_dir, size_threshold)
        #: What a queue plugin said when it handed the message off (``handed_off``), or None.
        self.handed_off_as: str | None = None

    def handed_off(self, text: str = "Queued") -> None:
        """For queue plugins: the message is safe now (renamed into ``new/``, a 250 from the
        next hop), so the client hears ``250 text`` whatever happens after, even if the hook
        is then cut short by its timeout or an error, or the server stops. Call it the moment
        the commit is done, before anything that may still wait."""
        self.handed_off_as = text

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
            self._body.finish()
            return False
        self._finish_header(len(self._header_buffer))
        self._body.finish()
        return True

    def _scan_header(self) -> bool:
        """Judge the lines completed since the last call (only those: linear overall)."""
        buf, start = self._header_buffer, self._line_start
        while True:
            end = buf.find(CRLF, max(start, self._searched))
            if end < 0 or end + 2 > self.max_header_size:
                if len(buf) > self.max_header_size:
                    self.header_too_large = True
                    self._finish_header(start)
                    return True
                self._line_start, self._searched = start, max(start, len(buf) - 1)
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
        self._line_start = self._searched = 0
        self.headers = Headers.parse(block) if block else Headers()
        self.headers_complete = True
        if body:
            self._body.write(body)

    @property
    def problem(self) -> Reply | None:
        """Why this message cannot be accepted whatever the plugins say, or None."""
        if self.header_too_large:
            return Canned.HEADER_TOO_BIG
        if self.max_received and len(self.headers.get_all("Received")) > self.max_received:
            return TOO_MANY_HOPS
        error = self._body.error
        if error is not None:
            return STORAGE_FULL if error.errno in NO_ROOM else CANNOT_STORE
        return None

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
