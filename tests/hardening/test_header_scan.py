"""Issue 21, item 3: the message header is found incrementally, and has a cap.

A header sent in 1 KiB pieces used to be rescanned from its start on every piece: the
work grew with the square of its size. Now each octet is looked at a bounded number of
times, whatever the pieces (counted, not timed). A header past ``[limits]
max_header_size`` gets ``552 5.3.4`` after the end of DATA, and nothing is delivered.
"""

from __future__ import annotations

from hardening_helpers import send_message

from qpgevent.testing import maildir_messages
from qpgevent.transaction import Transaction


class CountingBuffer(bytearray):
    """A bytearray that adds up how many octets its ``find`` calls looked at."""

    scanned = 0

    def find(self, sub, start=0, *args):  # type: ignore[override]
        found = super().find(sub, start, *args)
        CountingBuffer.scanned += (found + len(sub) if found >= 0 else len(self)) - max(0, start)
        return found


def header_of(size: int) -> bytes:
    lines, n = [], 0
    while sum(map(len, lines)) < size:
        lines.append(b"X-Filler-%06d: %s\r\n" % (n, b"v" * 60))
        n += 1
    return b"".join(lines)


def feed_in_pieces(transaction: Transaction, data: bytes, piece: int) -> bool:
    completed = False
    for i in range(0, len(data), piece):
        completed = transaction.write(data[i:i + piece]) or completed
    return completed


def test_a_header_in_1k_pieces_is_scanned_in_linear_work():
    header = header_of(100_000)
    transaction = Transaction(max_header_size=200_000)
    transaction._header_buffer = CountingBuffer()
    CountingBuffer.scanned = 0
    assert feed_in_pieces(transaction, header + b"\r\nbody\r\n", 1024)
    # Quadratic rescanning looks at ~ size * pieces / 2 = 5,000,000 octets; linear at ~ size.
    assert CountingBuffer.scanned <= 3 * len(header), CountingBuffer.scanned
    assert len(transaction.headers) == header.count(b"\r\n")
    assert list(transaction.body_chunks()) == [b"body\r\n"]


def test_one_long_line_in_small_pieces_is_scanned_in_linear_work():
    transaction = Transaction(max_header_size=200_000)
    transaction._header_buffer = CountingBuffer()
    CountingBuffer.scanned = 0
    line = b"Subject: " + b"s" * 50_000 + b"\r\n"
    assert not feed_in_pieces(transaction, line, 100)
    assert CountingBuffer.scanned <= 3 * len(line), CountingBuffer.scanned


def test_the_result_does_not_depend_on_the_pieces():
    message = header_of(5000) + b" folded\r\n\r\nbody line\r\n.. dotted\r\n"
    whole = Transaction()
    whole.write(message)
    whole.end_of_data()
    for piece in (1, 2, 3, 7, 64, 1000):
        split = Transaction()
        feed_in_pieces(split, message, piece)
        split.end_of_data()
        assert split.headers.as_bytes() == whole.headers.as_bytes()
        assert b"".join(split.message_chunks()) == b"".join(whole.message_chunks()) == message


def test_a_header_over_the_cap_is_marked_and_ends():
    transaction = Transaction(max_header_size=2000)
    assert feed_in_pieces(transaction, header_of(3000) + b"\r\nbody\r\n", 100)
    assert transaction.header_too_large
    under = Transaction(max_header_size=2000)
    feed_in_pieces(under, header_of(1500) + b"\r\nbody\r\n", 100)
    assert not under.header_too_large


def test_a_header_over_max_header_size_gets_552_and_nothing_is_delivered(make_server):
    server = make_server(max_header_size=4000)
    code, text = send_message(server, header_of(6000) + b"\r\nbody\r\n", 1024)
    assert (code, text.split()[0]) == (552, "5.3.4"), text
    assert maildir_messages(server.maildir) == {}
    # Under the cap, the same kind of message is delivered whole.
    code, _ = send_message(server, header_of(3000) + b"\r\nbody\r\n", 1024)
    assert code == 250
    [delivered] = maildir_messages(server.maildir).values()
    assert delivered.endswith(header_of(3000) + b"\r\nbody\r\n")


def test_the_default_cap_is_100_kib(make_server):
    server = make_server()
    code, text = send_message(server, header_of(110_000) + b"\r\nbody\r\n", 1024)
    assert code == 552, text
    with server.smtp() as client:  # and the session goes on: the next message is served
        client.sendmail("a@client.test", ["bob@example.test"], header_of(90_000) + b"\r\nbody\r\n")
    assert len(maildir_messages(server.maildir)) == 1
