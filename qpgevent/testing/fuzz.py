"""Fuzz targets of the sans-I/O core: the properties every input must keep, and inputs for them.

Each ``check_*`` function takes one input (bytes, text, and where to split the bytes into
pieces) and raises ``AssertionError`` naming the broken property; anything else it raises
is a finding too. They are driven two ways: by hypothesis in the test suite (a short run
with a fixed seed, ``tests/hardening/test_fuzz_core.py``), and by ``tools/fuzz_core.py``,
which makes a million inputs with its own fast generator (``random_input``): mutations of
a corpus of real SMTP fragments.

The properties:
- framing (``CommandFramer``, ``DataReader``): the pieces the bytes come in never change
  the result; a command line never holds CR or LF and never passes the limit; the
  buffer never grows past the limit; a message accepted without ``allow_bare_lf`` holds
  CR and LF only as CRLF, and no NUL;
- the conversation (``SmtpProtocol`` answered by a plausible server): only its documented
  events, in the same order whatever the pieces; no CR or LF in any command's text;
  it ends (a bounded number of events);
- addresses (``Address.parse``): only ``AddressError``; a parsed path holds no control
  character and reads back to itself;
- PROXY headers (``proxy.parse``): only ``ProxyError``; a prefix of a good header asks
  for more, never fails; addresses are plain (no scope id, no control character).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable

from ..core.address import Address, AddressError
from ..core.protocol import (CONNECTION_CLOSED, NEED_DATA, Auth, AuthResponse, Bdat, ChunkEnd, Command, Data, Ehlo,
                       Helo, Limits, Mail, MessageData, MessageEnd, Quit, Rcpt, Rejected, SmtpProtocol, Starttls,
                       State, Unknown)
from ..core.proxy import ProxyError, parse as parse_proxy
from ..core.reply import Reply, reply
from ..core.wire import BareLineEnding, CommandFramer, DataReader, LineTooLong

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_ALLOWED_EVENTS = (Command, AuthResponse, Rejected, MessageData, MessageEnd, ChunkEnd)


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo its length, sorted, repeats dropped)."""
    if not data:
        return []
    points = sorted({cut % len(data) for cut in cuts} - {0})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# -- framing ---------------------------------------------------------------------------
def frame_commands(chunks: list[bytes], max_line: int) -> list[object]:
    framer, out = CommandFramer(max_line), []
    for chunk in chunks:
        framer.feed(chunk)
        while (line := framer.next_line()) is not None:
            out.append(line if isinstance(line, bytes) else type(line).__name__)
        assert len(framer.buffer) < max_line + len(chunk), "the command buffer grew past the limit"
        assert len(framer.buffer) < max_line or not framer.buffer.count(b"\n"), "a whole line left behind"
    return out


def check_command_framer(data: bytes, cuts: list[int], max_line: int = 512) -> None:
    whole = frame_commands([data], max_line)
    assert frame_commands(pieces(data, cuts), max_line) == whole, "the pieces changed the command lines"
    for line in whole:
        if isinstance(line, bytes):
            assert b"\r" not in line and b"\n" not in line, f"CR or LF in a command line: {line!r}"
            assert len(line) + 2 <= max_line, "a command line past the limit"
        else:
            assert line in (LineTooLong.__name__, BareLineEnding.__name__)


def read_message(chunks: list[bytes], **options: object) -> tuple[bytes, bytes | None, object, int]:
    reader = DataReader(**options)  # type: ignore[arg-type]
    kept, rest = b"", None
    for i, chunk in enumerate(chunks):
        out, rest = reader.feed(chunk)
        kept += out
        if rest is not None:
            rest += b"".join(chunks[i + 1:])  # what follows the end is the next command's
            break
    return kept, rest, reader.problems, reader.size


def check_data_reader(data: bytes, cuts: list[int], nul_bytes: str = "reject", allow_bare_lf: bool = False) -> None:
    options = {"max_size": 4096, "max_line": 1000, "allow_bare_lf": allow_bare_lf, "nul_bytes": nul_bytes}
    data += b"\r\n.\r\n"  # the message ends: what matters is what it came to (bytes of a long
    # line come out sooner or later depending on the pieces, but all of them, once)
    whole = read_message([data], **options)
    split = read_message(pieces(data, cuts), **options)
    kept, rest, problems, size = whole
    refused = (problems.too_big or problems.line_too_long or problems.bare_line_ending  # type: ignore[attr-defined]
               or problems.nul_byte)  # type: ignore[attr-defined]
    if refused:  # what was kept of a refused message is thrown away: the rest must agree
        assert split[1:] == whole[1:], f"the pieces changed the refusal: {whole[1:]!r} != {split[1:]!r}"
        return
    assert split == whole, f"the pieces changed the message: {whole!r} != {split!r}"
    assert rest is not None
    assert allow_bare_lf or kept.count(b"\r") == kept.count(b"\n") == kept.count(b"\r\n"), "bare CR or LF accepted"
    assert kept == b"" or kept.endswith(b"\r\n"), "an accepted message not ending in CRLF"
    assert nul_bytes == "accept" or b"\0" not in kept, "NUL accepted"
    assert len(kept) == size or nul_bytes == "strip"


# -- the conversation -----------------------------------------------------------------------
_OK = reply(250, "2.0.0", "OK")


def _answer(event: object) -> Reply:
    """What a plain server says: yes to everything it can (so the state moves), no to TLS and AUTH."""
    if isinstance(event, Rejected):
        return event.reply
    if isinstance(event, (MessageEnd, ChunkEnd)):
        return event.problem or _OK
    if isinstance(event, Data):
        return reply(354, None, "go ahead")
    if isinstance(event, Quit):
        return reply(221, "2.0.0", "bye", close=True)
    if isinstance(event, Starttls):
        return reply(454, "4.7.0", "TLS not available")  # 220 would make the pieces matter (by design)
    if isinstance(event, (Auth, AuthResponse)):
        return reply(535, "5.7.8", "no")
    if isinstance(event, Unknown):
        return reply(500, "5.5.1", "Unrecognized command")
    return _OK


def converse(chunks: list[bytes], limits: Limits) -> list[tuple[str, object]]:
    protocol, events = SmtpProtocol(limits), []
    budget = 4 * sum(map(len, chunks)) + 16  # every event eats input: it must end
    for chunk in [*chunks, b""]:
        protocol.receive_data(chunk)
        while True:
            event = protocol.next_event()
            if event is NEED_DATA or event is CONNECTION_CLOSED:
                break
            budget -= 1
            assert budget > 0, "the conversation does not end"
            assert isinstance(event, _ALLOWED_EVENTS), f"undocumented event {event!r}"
            if isinstance(event, MessageData):
                if events and events[-1][0] == "data":  # the pieces may cut a message anywhere
                    events[-1] = ("data", events[-1][1] + event.data)  # type: ignore[operator]
                else:
                    events.append(("data", event.data))
                continue
            if isinstance(event, Command):
                for text in (event.line, event.argument):
                    assert "\r" not in text and "\n" not in text, f"CR or LF in {event!r}"
                if isinstance(event, (Mail, Rcpt)):
                    assert "\r" not in event.path and "\n" not in event.path, f"CR or LF in {event!r}"
                if isinstance(event, (Helo, Ehlo)):
                    assert "\r" not in event.domain and "\n" not in event.domain, f"CR or LF in {event!r}"
            events.append((type(event).__name__, _describe(event)))
            if isinstance(event, Bdat):
                protocol.start_chunk(event)  # its octets come next, as MessageData
                continue
            protocol.send(_answer(event))
        if protocol.state is State.CLOSED:
            break
    return events


def _describe(event: object) -> object:
    if isinstance(event, Rejected):
        return event.reply.code, event.reply.enhanced
    if isinstance(event, MessageEnd):
        return event.size, event.problem.code if event.problem else None
    if isinstance(event, AuthResponse):
        return event.data
    return event


def check_conversation(data: bytes, cuts: list[int], max_message_size: int = 2048) -> None:
    limits = Limits(max_message_size=max_message_size, max_recipients=5, max_bad_commands=10)
    whole = converse([data], limits)
    assert converse(pieces(data, cuts), limits) == whole, "the pieces changed the conversation"


# -- addresses and PROXY headers ------------------------------------------------------------
def check_address(text: str, smtputf8: bool = False) -> None:
    try:
        address = Address.parse(text, smtputf8=smtputf8, allow_null=True, allow_postmaster=True)
    except AddressError:
        return
    formatted = address.format()
    assert not _CONTROL.search(formatted), f"control character in a parsed path: {formatted!r}"
    again = Address.parse(formatted, smtputf8=smtputf8, allow_null=True, allow_postmaster=True)
    assert again == address, f"{text!r} -> {formatted!r} -> {again!r}"


def check_proxy(data: bytes) -> None:
    try:
        parsed = parse_proxy(data)
    except ProxyError:
        return
    if parsed is None:
        return
    header, used = parsed
    assert 0 < used <= len(data)
    for ip in (header.source_ip, header.dest_ip):
        if ip:
            assert str(ipaddress.ip_address(ip)) == ip and "%" not in ip, f"not a plain address: {ip!r}"
    assert 0 <= header.source_port <= 65535 and 0 <= header.dest_port <= 65535
    for end in range(1, used):  # every prefix of a good header asks for more
        assert parse_proxy(data[:end]) is None, f"a prefix of a good header was refused: {data[:end]!r}"


# -- inputs for the long run -----------------------------------------------------------------
CORPUS = [
    b"EHLO client.example\r\n", b"HELO [192.0.2.1]\r\n", b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n",
    b"MAIL FROM:<>\r\n", b"RCPT TO:<postmaster>\r\n", b"RCPT TO:<\"q u\"@[IPv6:2001:db8::1]>\r\n",
    b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n", b"..dot\r\n", b".\r\n", b"RSET\r\n", b"NOOP\r\n",
    b"VRFY x\r\n", b"HELP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"AUTH PLAIN AGEAYg==\r\n", b"AUTH LOGIN\r\n",
    b"*\r\n", b"\r\n", b"\n", b"\r", b"\0", b".\n", b"\n.\n", b"\r.\r", b"\xff\xfe", b"X" * 600, b"BDAT 5\r\n",
    b"BDAT 12 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 3000\r\n", b"BDAT x\r\n", b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
    b"MAIL FROM:<a@b.example> SMTPUTF8\r\n", "RCPT TO:<ü@ü.example>\r\n".encode(), b"RCPT TO:<a@[300.1.1.1]>\r\n",
]
PROXY_CORPUS = [
    b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\r\n", b"PROXY TCP6 2001:db8::7 ::1 1 2\r\n",
    b"PROXY UNKNOWN\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x07\xc6\x33\x64\x19\x9c\x40\x00\x19",
]
ADDRESS_CORPUS = ["<a@b.example>", "<>", "<postmaster>", '<"a b"@c.example>', "<@r.example:a@b.example>",
                  "<a@[192.0.2.1]>", "<a@[IPv6:2001:db8::1]>", "<ü@ü.example>", "<a.b@c-d.example>"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits: flip, insert, delete, duplicate, splice a special octet."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randint(0, len(buf))
        if op == 0 and buf and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = bytes([rng.choice(b"\r\n\0.:<>@[]%\" \t\x7f\xff")])
        elif op == 2 and buf:
            del buf[at:at + rng.randint(1, 8)]
        elif op == 3 and buf:
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start:start + rng.randint(1, 32)]
        else:
            buf[at:at] = rng.choice(CORPUS)
    return bytes(buf)


def random_input(rng: random.Random, target: str) -> tuple[object, ...]:
    """Arguments for ``check_<target>``: a few corpus pieces, mutated, and random cut points."""
    cuts = [rng.randrange(1 << 16) for _ in range(rng.randint(0, 6))]
    if target == "address":
        text = mutate(rng, rng.choice(ADDRESS_CORPUS).encode()).decode("utf-8", "surrogateescape")
        return text, rng.random() < 0.5
    if target == "proxy":
        return (mutate(rng, rng.choice(PROXY_CORPUS)),)
    data = b"".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 12)))
    data = mutate(rng, data) if rng.random() < 0.9 else data
    if target == "data_reader":
        return data, cuts, rng.choice(("reject", "strip", "accept")), rng.random() < 0.2
    return data, cuts


TARGETS = {"command_framer": check_command_framer, "data_reader": check_data_reader,
           "conversation": check_conversation, "address": check_address, "proxy": check_proxy}
