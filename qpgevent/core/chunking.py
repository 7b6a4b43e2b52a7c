"""BDAT framing (RFC 3030 CHUNKING): the command's argument, and a chunk's octets.

A ``BDAT n [LAST]`` command is followed by exactly ``n`` octets of message, sent as
they are: no dot-stuffing, no line structure (so BINARYMIME content can ride in it).
Whatever we think of the command, once its size is known those octets are read off the
stream (and thrown away if refused), so the next command starts where the client
thinks it does; a BDAT whose size cannot be read leaves us no way to find that place,
and the protocol closes (``Canned.BAD_BDAT``). Pure: bytes in, bytes out.
"""

from __future__ import annotations

import re

#: RFC 3030 2: ``bdat-cmd ::= "BDAT" SP chunk-size [ SP end-marker ] CR LF``; like
#: RFC 1870's size-value, at most 20 digits (and no signs, spaces or non-ASCII digits).
_BDAT_ARG = re.compile(r"([0-9]{1,20})(?: (LAST))?", re.IGNORECASE)


def parse_bdat(argument: str) -> tuple[int, bool] | None:
    """``(chunk size, last)`` from BDAT's argument, or None: malformed."""
    match = _BDAT_ARG.fullmatch(argument)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) is not None


class ChunkReader:
    """The octets of one chunk, taken from the input as they arrive.

    ``keep`` octets are handed out; the rest of the chunk (refused, or past the size
    limit) is read and dropped. ``then`` is what comes after the chunk's last octet.
    """

    def __init__(self, size: int, keep: int, then: object = None) -> None:
        self.remaining = size  #: octets of the chunk still to come
        self.keep = min(keep, size)  #: of those, how many to hand out (the first ones)
        self.then = then

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def take(self, buffer: bytearray) -> bytes:
        """Remove the chunk's next octets from ``buffer``; the part to keep."""
        count = min(self.remaining, len(buffer))
        kept = min(count, self.keep)
        piece = bytes(buffer[:kept])
        del buffer[:count]
        self.remaining -= count
        self.keep -= kept
        return piece
