"""Issue 21, item 8: NUL octets in message text are refused by default (``[smtp] nul_bytes``).

RFC 5322 4.1: NUL "was once allowed, but is no longer"; RFC 2045 2.7/2.8: neither 7bit nor
8bit data holds NULs. ``reject`` (default): ``550 5.6.0`` after the end of DATA, nothing
delivered; ``strip``: delivered without them; ``accept``: delivered as sent. The framer
does it (``wire.DataReader``), whatever the pieces the NUL comes in.
"""

from __future__ import annotations

import pytest

from hardening_helpers import send_message

from qpgevent.testing import maildir_messages
from qpgevent.core.wire import DataReader

MESSAGE = b"Subject: nul\r\n\r\nbefore\0after\r\n\0\r\n.. dotted\0\r\n"


def read_in_pieces(reader: DataReader, data: bytes, piece: int) -> bytes:
    kept = b""
    for i in range(0, len(data), piece):
        out, rest = reader.feed(data[i:i + piece])
        kept += out
        if rest is not None:
            return kept
    raise AssertionError("no end of message")


@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
@pytest.mark.parametrize("mode, kept, refused", [
    ("reject", None, True),
    ("strip", b"Subject: nul\r\n\r\nbeforeafter\r\n\r\n. dotted\r\n", False),
    ("accept", b"Subject: nul\r\n\r\nbefore\0after\r\n\0\r\n. dotted\0\r\n", False),
])
def test_the_framer_rejects_strips_or_accepts_nuls(mode, kept, refused, piece):
    reader = DataReader(0, nul_bytes=mode)
    got = read_in_pieces(reader, MESSAGE + b".\r\n", piece)
    assert reader.problems.nul_byte is refused
    if kept is not None:
        assert got == kept
    assert b"\0" not in got or mode == "accept"


def test_a_message_without_nuls_is_untouched_in_every_mode():
    for mode in ("reject", "strip", "accept"):
        reader = DataReader(0, nul_bytes=mode)
        assert read_in_pieces(reader, b"a\r\nb\r\n.\r\n", 3) == b"a\r\nb\r\n"
        assert not reader.problems.nul_byte


def test_nuls_are_refused_by_default(make_server):
    server = make_server()
    code, text = send_message(server, MESSAGE)
    assert (code, text.split()[0]) == (550, "5.6.0"), text
    assert maildir_messages(server.maildir) == {}


@pytest.mark.parametrize("mode, body", [("strip", b"beforeafter\r\n\r\n. dotted\r\n"),
                                        ("accept", b"before\0after\r\n\0\r\n. dotted\0\r\n")])
def test_nuls_stripped_or_accepted_when_configured(make_server, mode, body):
    server = make_server(nul_bytes=mode)
    assert send_message(server, MESSAGE)[0] == 250
    [message] = maildir_messages(server.maildir).values()
    assert message.endswith(b"Subject: nul\r\n\r\n" + body)
