"""CHUNKING / BDAT (RFC 3030) with BINARYMIME, black-box over real sockets.

The real server (in process, or ``python -m qpgevent`` as a child for the memory bound);
smtplib as the client where it can (it has no BDAT of its own: the command and its octets
go out with ``send``, the reply comes back with ``getreply``), a raw socket for pipelining.
The sequencing rules, in memory and over a socket, are in ``tests/transcripts/bdat_chunking.smtp``;
the framing in ``tests/unit/test_chunking.py``.
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpgevent.testing import DEFAULT_PLUGINS, maildir_messages, peak_memory_kib, strip_trace

SENDER = "a@client.test"
RECIPIENT = "bob@example.test"
MiB = 1 << 20
PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")
HEADER = b"From: a@client.test\r\nDate: Mon, 7 Dec 2026 04:00:00 +0000\r\nSubject: chunked\r\n"


def bdat(client: smtplib.SMTP, chunk: bytes, last: bool = False) -> tuple[int, bytes]:
    client.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
    return client.getreply()


def begin(client: smtplib.SMTP, *options: str) -> None:
    client.ehlo()
    assert client.mail(SENDER, list(options))[0] == 250
    assert client.rcpt(RECIPIENT)[0] == 250


def binary_body() -> bytes:
    """Octets DATA could not carry as they are: NULs, bare CR and LF, lone dots, a 3000-octet line."""
    return (b"\r\n.\r\n..leading dots\r\n.\r\nbare\nLF and bare\rCR\0NUL " + bytes(range(256))
            + b"x" * 3000 + b"\r\n.\r\n")


def test_ehlo_offers_chunking_and_binarymime(server):
    with server.smtp(timeout=10) as client:
        client.ehlo()
        assert client.has_extn("chunking") and client.has_extn("binarymime")


def test_binary_message_in_chunks_is_delivered_byte_exact(server):
    message = HEADER + binary_body()
    cuts = [0, 7, len(HEADER) + 3, len(HEADER) + 500, len(message)]  # mid-field, mid-body
    with server.smtp(timeout=10) as client:
        begin(client, "BODY=BINARYMIME")
        for start, end in zip(cuts, cuts[1:-1]):
            assert bdat(client, message[start:end]) == (250, b"2.0.0 %d octets received" % (end - start))
        code, text = bdat(client, message[cuts[-2]:], last=True)
        assert code == 250 and text.startswith(b"2.0.0 Queued"), text
        assert client.noop()[0] == 250
    [delivered] = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == message


def test_pipelined_bdat_gets_one_reply_per_chunk_in_order(server):
    first, second = HEADER + b"\r\none ", b"two\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as peer:
        reader = peer.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        peer.sendall(b"EHLO client.example.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<bob@example.test>\r\n"
                     + b"BDAT %d\r\n" % len(first) + first + b"BDAT %d LAST\r\n" % len(second) + second
                     + b"QUIT\r\n")  # one write: RFC 3030 4.2
        replies = [line for line in reader.read().split(b"\r\n") if line and not line.startswith(b"250-")]
    assert [line[:3] for line in replies] == [b"250", b"250", b"250", b"250", b"250", b"221"]
    assert replies[3] == b"250 2.0.0 %d octets received" % len(first)
    assert replies[4].startswith(b"250 2.0.0 Queued")
    [delivered] = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == first + second


def test_size_is_enforced_across_chunks_and_the_stream_stays_in_step(make_server):
    server = make_server(max_message_size=1000)
    with server.smtp(timeout=10) as client:
        begin(client)
        assert bdat(client, HEADER + b"\r\n" + b"a" * 500)[0] == 250
        code, text = bdat(client, b"NOOP\r\n" * 100)  # 600 more: past 1000; read, not obeyed
        assert (code, text) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
        assert client.noop()[0] == 250  # the next command is found where it was sent
        assert bdat(client, b"end\r\n", last=True)[0] == 552
        begin(client)  # the transaction is over; the next one counts from zero
        assert bdat(client, HEADER + b"\r\nsmall\r\n", last=True)[0] == 250
    [delivered] = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == HEADER + b"\r\nsmall\r\n"


def test_rset_between_chunks_drops_the_message(server):
    with server.smtp(timeout=10) as client:
        begin(client)
        assert bdat(client, HEADER + b"\r\nhalf")[0] == 250
        assert client.rset()[0] == 250
        assert bdat(client, b"x", last=True)[0] == 503  # no transaction now; its octet read
        assert client.noop()[0] == 250
    assert maildir_messages(server.maildir) == {}


def test_a_chunk_that_never_comes_meets_the_data_timeout(make_server):
    # A long command_timeout: only data_timeout (a chunk's octets are message) ends this quickly.
    server = make_server(command_timeout=30, data_timeout=0.3)
    with server.smtp(timeout=10) as client:
        begin(client)
        assert bdat(client, HEADER + b"\r\nfirst\r\n")[0] == 250
        client.send(b"BDAT 1000000 LAST\r\nonly this")  # then nothing more
        code, text = client.getreply()
        assert code == 421 and text.startswith(b"4.4.2 ") and b"Timeout" in text
    assert maildir_messages(server.maildir) == {}
    assert list((server.maildir / "tmp").iterdir()) == []


def without_received(message: bytes) -> bytes:
    """``message`` without its first field, our Received (its time and id differ per message)."""
    assert message.startswith(b"Received:")
    lines = message.split(b"\r\n")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def test_plugins_see_the_same_message_by_bdat_as_by_data(make_server):
    server = make_server("[[headers]]\n[[message_view]]\n" + DEFAULT_PLUGINS, plugin_dirs=PLUGIN_DIR)
    view = sys.modules["qpgevent_plugins.message_view"]  # as the loader imported it
    view.SEEN.clear()
    message = HEADER + b"To: bob@example.test\r\n\r\nbody line\r\n.dot line\r\nlast\r\n"
    with server.smtp(timeout=10) as client:
        client.ehlo()
        assert client.sendmail(SENDER, [RECIPIENT], message) == {}  # DATA (smtplib stuffs the dot)
        begin(client)
        assert bdat(client, message[:10])[0] == 250
        assert bdat(client, message[10:70])[0] == 250
        assert bdat(client, message[70:], last=True)[0] == 250
        # The headers plugin refuses a message without Date the same way, whichever way it came.
        undated = message.replace(b"Date: Mon, 7 Dec 2026 04:00:00 +0000\r\n", b"")
        with pytest.raises(smtplib.SMTPDataError) as by_data:
            client.sendmail(SENDER, [RECIPIENT], undated)
        begin(client)
        assert bdat(client, undated, last=True) == (by_data.value.smtp_code, by_data.value.smtp_error)
    assert by_data.value.smtp_code == 554 and b"missing required header: Date" in by_data.value.smtp_error
    by_hook: dict[str, list[object]] = {}
    for hook, *seen in view.SEEN:
        by_hook.setdefault(hook, []).append(seen)
    headers_data, headers_bdat = by_hook["data_headers_end"][:2]
    assert headers_data == headers_bdat and ("Subject", "chunked") in [(n, v.strip()) for n, v in headers_data[0]]
    (data_message, data_size), (bdat_message, bdat_size) = by_hook["data_post"]
    assert without_received(data_message) == without_received(bdat_message) == message
    assert data_size == bdat_size == len(message)
    delivered = [strip_trace(m) for m in maildir_messages(server.maildir).values()]
    assert delivered == [message, message]


def binary_megabytes(count: int) -> Iterator[bytes]:
    """``count`` MiB of numbered, varied octets (every byte value), 1 MiB at a time."""
    for k in range(count):
        seed = hashlib.sha256(b"%d" % k).digest()
        yield (seed * (MiB // len(seed)))[:MiB]


def test_50_mib_by_bdat_in_1_mib_chunks_in_bounded_memory(server_process):
    process = server_process(max_message_size=100 * MiB, workers=1)
    (pid,) = process.worker_pids()  # the worker holds the session
    with process.smtp(timeout=60) as client:
        begin(client, "BODY=BINARYMIME")  # warm up spool, Maildir and thread pool first
        assert bdat(client, HEADER + b"\r\nwarm-up\r\n", last=True)[0] == 250
        before = peak_memory_kib(pid)
        digest = hashlib.sha256(HEADER + b"\r\n")
        begin(client, "BODY=BINARYMIME")
        assert bdat(client, HEADER + b"\r\n")[0] == 250
        chunks = list(range(50))
        for k, chunk in zip(chunks, binary_megabytes(50)):
            digest.update(chunk)
            code, text = bdat(client, chunk, last=k == chunks[-1])
            assert code == 250, text
        after = peak_memory_kib(pid)
    growth_mib = (after - before) / 1024
    assert growth_mib < 25, f"peak memory grew by {growth_mib:.1f} MiB for a 50 MiB message"
    delivered = [m for m in maildir_messages(process.maildir).values() if len(m) > 50 * MiB]
    assert len(delivered) == 1
    assert hashlib.sha256(strip_trace(delivered[0])).hexdigest() == digest.hexdigest()
    assert list((process.maildir.parent / "spool" / "tmp").iterdir()) == []
    assert process.terminate(10) == 0
