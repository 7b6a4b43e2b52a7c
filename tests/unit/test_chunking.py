"""BDAT framing in the protocol core (RFC 3030), bytes in and events out, no sockets.

A chunk's octets come out as MessageData exactly as sent (no dot-unstuffing, no line
checks), cut wherever the reads cut them; each chunk but the LAST ends in a ChunkEnd,
the LAST in the MessageEnd that DATA's final dot gives. Whatever is refused, the
chunk's octets are read off the stream, so the next command is found where the client
put it.
"""

from __future__ import annotations

import pytest

from qpgevent.core.chunking import ChunkReader, parse_bdat
from qpgevent.core.protocol import (CONNECTION_CLOSED, NEED_DATA, Bdat, ChunkEnd, Limits, MessageData, MessageEnd,
                                    Noop, Rejected, Rset, SmtpProtocol, State)
from qpgevent.core.reply import Canned, reply

OK = reply(250, "2.0.0", "OK")
HELLO = reply(250, None, "mx.example.test Hi there")


def answer(protocol: SmtpProtocol, line: bytes, response=OK) -> bytes:
    protocol.receive_data(line + b"\r\n")
    protocol.next_event()
    return protocol.send(response)


def in_state(state: State, limits: Limits = Limits()) -> SmtpProtocol:
    """A protocol walked to ``state`` (up to RCPT) by accepted commands."""
    protocol = SmtpProtocol(limits)
    steps = [b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<b@example.test>"]
    for line, reached in zip(steps, [State.READY, State.MAIL, State.RCPT]):
        if protocol.state is state:
            break
        answer(protocol, line, HELLO if reached is State.READY else OK)
    assert protocol.state is state
    return protocol


def events(protocol: SmtpProtocol, data: bytes = b"", respond=OK) -> list[object]:
    """Feed ``data``; take events to the next NEED_DATA, starting each BDAT's chunk and
    answering each event that awaits a reply with ``respond``."""
    if data:
        protocol.receive_data(data)
    out: list[object] = []
    for _ in range(1000):
        event = protocol.next_event()
        out.append(event)
        if event is NEED_DATA or event is CONNECTION_CLOSED:
            return out
        if isinstance(event, Bdat):
            protocol.start_chunk(event)
        elif protocol.awaiting_reply:
            protocol.send(respond)
    raise AssertionError("no end of events")


def message(found: list[object]) -> bytes:
    return b"".join(event.data for event in found if isinstance(event, MessageData))


def ends(found: list[object]) -> list[object]:
    return [event for event in found if isinstance(event, (ChunkEnd, MessageEnd, Rejected))]


@pytest.mark.parametrize("argument,parsed", [
    ("0", (0, False)), ("10 LAST", (10, True)), ("10 last", (10, True)), ("0 LAST", (0, True)),
    ("9" * 20, (int("9" * 20), False)),
    ("", None), ("LAST", None), ("-1", None), ("1.5", None), ("10  LAST", None), ("10 FIRST", None),
    ("9" * 21, None), ("²", None), ("10 LAST x", None), (" 10", None),
])
def test_bdat_argument(argument, parsed):
    assert parse_bdat(argument) == parsed


def test_chunk_reader_keeps_the_first_octets_and_drops_the_rest():
    buffer = bytearray(b"abcdefNEXT")
    reader = ChunkReader(6, 4)
    assert reader.take(buffer) == b"abcd" and reader.done and buffer == b"NEXT"


def test_one_chunk_last_is_the_whole_message_as_sent():
    protocol = in_state(State.RCPT)
    body = b"Subject: x\r\n\r\n.leading dot\r\nbare\nLF and \0 NUL\r\n.\r\n"
    found = events(protocol, b"BDAT %d LAST\r\n" % len(body) + body)
    assert isinstance(found[0], Bdat) and found[0].size == len(body) and found[0].last
    assert message(found) == body  # not unstuffed, not judged: BINARYMIME octets
    assert ends(found) == [MessageEnd(len(body), None)]
    assert protocol.state is State.READY


def test_chunk_lengths_across_reads_and_chunks_across_one_read():
    protocol = in_state(State.RCPT)
    protocol.receive_data(b"BDAT 10\r\n0123")
    found = events(protocol)
    assert message(found) == b"0123" and protocol.state is State.DATA and found[-1] is NEED_DATA
    found = events(protocol, b"456789BDAT 3 LAST\r\nabcNOOP\r\n")
    assert message(found) == b"456789abc"
    assert ends(found) == [ChunkEnd(10, 10, None), MessageEnd(13, None)]
    assert isinstance(found[-2], Noop)  # the command after the LAST chunk is a command again
    assert protocol.state is State.READY


def test_a_chunk_that_looks_like_commands_is_message():
    protocol = in_state(State.RCPT)
    inside = b"RSET\r\nMAIL FROM:<evil@x>\r\n"
    found = events(protocol, b"BDAT %d LAST\r\n" % len(inside) + inside)
    assert message(found) == inside and not any(isinstance(e, Rset) for e in found)


def test_zero_length_last_ends_the_message():
    protocol = in_state(State.RCPT)
    found = events(protocol, b"BDAT 5\r\nhelloBDAT 0 LAST\r\n")
    assert message(found) == b"hello"
    assert ends(found) == [ChunkEnd(5, 5, None), MessageEnd(5, None)]


def test_between_chunks_data_mail_and_rcpt_are_refused_and_rset_ends_it():
    protocol = in_state(State.RCPT)
    events(protocol, b"BDAT 2\r\nab")
    assert protocol.state is State.BDAT
    found = events(protocol, b"DATA\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert [e.reply for e in found if isinstance(e, Rejected)] == [
        Canned.DATA_AFTER_BDAT, Canned.NESTED_MAIL, Canned.RCPT_AFTER_BDAT]
    assert Canned.DATA_AFTER_BDAT.code == 503 and Canned.DATA_AFTER_BDAT.enhanced == "5.5.1"
    found = events(protocol, b"RSET\r\n")
    assert isinstance(found[0], Rset) and protocol.state is State.READY
    found = events(protocol, b"BDAT 3\r\nxyz")  # no transaction now: refused, its octets read
    assert ends(found) == [Rejected(Canned.MAIL_FIRST, "BDAT 3")] and message(found) == b""


def test_binarymime_refuses_data():
    protocol = in_state(State.READY)
    answer(protocol, b"MAIL FROM:<a@client.test> BODY=BINARYMIME", OK)
    answer(protocol, b"RCPT TO:<b@example.test>", OK)
    found = events(protocol, b"DATA\r\n")
    assert ends(found) == [Rejected(Canned.BINARYMIME_NEEDS_BDAT, "DATA")]


@pytest.mark.parametrize("state,refusal", [(State.NEED_HELLO, Canned.MAIL_FIRST),
                                           (State.READY, Canned.MAIL_FIRST), (State.MAIL, Canned.RCPT_FIRST)])
def test_out_of_order_bdat_still_reads_its_octets(state, refusal):
    protocol = in_state(state)
    found = events(protocol, b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert ends(found) == [Rejected(refusal, "BDAT 6 LAST")]
    assert isinstance(found[-2], Noop)  # "QUIT\r\n" was the chunk, NOOP the next command


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT -5 LAST", b"BDAT 5 NOW", b"BDAT " + b"1" * 21])
def test_bad_syntax_is_501_then_the_connection_closes(line):
    protocol = in_state(State.RCPT)
    protocol.receive_data(line + b"\r\nQUIT\r\n")
    event = protocol.next_event()
    assert event == Rejected(Canned.BAD_BDAT, line.decode())
    out = protocol.send(Canned.BAD_BDAT)
    assert out.startswith(b"501 5.5.4 ") and b"\r\n421 4.5.0 " in out
    assert protocol.state is State.CLOSED


def test_size_enforced_across_chunks_and_the_rest_read_and_dropped():
    protocol = in_state(State.RCPT, Limits(max_message_size=10))
    found = events(protocol, b"BDAT 6\r\nabcdef")
    assert ends(found) == [ChunkEnd(6, 6, None)]
    found = events(protocol, b"BDAT 6\r\nghijkl" + b"BDAT 2 LAST\r\nmn" + b"NOOP\r\n")
    assert message(found) == b""  # past the limit: nothing more kept
    assert ends(found) == [ChunkEnd(6, 12, Canned.TOO_BIG), MessageEnd(14, Canned.TOO_BIG)]
    assert isinstance(found[-2], Noop) and protocol.state is State.READY
    found = events(protocol, b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nBDAT 4 LAST\r\nabcd")
    assert ends(found)[-1] == MessageEnd(4, None)  # the next transaction counts from zero


def test_a_chunk_over_the_limit_by_itself_is_read_and_refused():
    protocol = in_state(State.RCPT, Limits(max_message_size=100))
    found = events(protocol, b"BDAT 1000 LAST\r\n" + b"x" * 1000 + b"NOOP\r\n")
    assert message(found) == b"" and ends(found) == [MessageEnd(1000, Canned.TOO_BIG)]
    assert isinstance(found[-2], Noop)


def test_client_closing_inside_a_chunk():
    protocol = in_state(State.RCPT)
    events(protocol, b"BDAT 100 LAST\r\nshort")
    protocol.receive_data(b"")
    assert protocol.next_event() is CONNECTION_CLOSED


def test_a_refused_chunk_reply_keeps_the_transaction_for_rset():
    protocol = in_state(State.RCPT)
    events(protocol, b"BDAT 1\r\na", respond=reply(554, "5.7.1", "no"))
    assert protocol.state is State.BDAT
    assert ends(events(protocol, b"BDAT 1 LAST\r\nb")) == [MessageEnd(2, None)]


def test_ehlo_between_chunks_resets():
    protocol = in_state(State.RCPT)
    events(protocol, b"BDAT 1\r\na")
    answer(protocol, b"EHLO client.test", HELLO)
    assert protocol.state is State.READY


def test_a_bdat_answered_before_its_octets_has_them_read_and_dropped():
    protocol = in_state(State.RCPT)
    protocol.receive_data(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    command = protocol.next_event()
    assert protocol.send(reply(554, "5.7.1", "no")).startswith(b"554 ")  # a plugin's own reply
    protocol.start_chunk(command)
    assert isinstance(protocol.next_event(), Noop)  # the chunk said nothing, and was no command

