"""The milter codec without sockets: packets as the protocol lays them out, replies decoded
from bytes however they are cut, and garbage (bad lengths, unknown codes, malformed data)
refused as ProtocolError. Also the header and body edits milters ask for."""

from __future__ import annotations

import struct

import pytest

from qpgevent import milter_protocol as mp
from qpgevent.core.headers import Headers
from qpgevent.milter_client import parse_address
from qpgevent.transaction import Transaction


def reply(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def test_commands_are_framed_with_length_code_and_nul_terminated_strings():
    assert mp.encode_optneg() == b"\0\0\0\rO" + struct.pack("!III", 6, 0x1FF, 0x1FF7FF)
    assert mp.encode_connect("client.test", "192.0.2.1", 25000) == (
        struct.pack("!I", 26) + b"Cclient.test\x004" + struct.pack("!H", 25000) + b"192.0.2.1\0")
    assert mp.encode_connect("h", "2001:db8::1", 1)[6:8] == b"\x006"
    assert mp.encode_connect("h", "", 0) == b"\0\0\0\x04Ch\0U"
    assert mp.encode_envelope(mp.Command.MAIL, "a@b.test", ["SIZE=10", "BODY=8BITMIME"]) == (
        b"\0\0\0\x22M<a@b.test>\0SIZE=10\0BODY=8BITMIME\0")
    assert mp.encode_macros(mp.Command.MAIL, {"i": "Q1", "{mail_addr}": "a@b"}) == (
        b"\0\0\0\x17DMi\0Q1\0{mail_addr}\0a@b\0")
    assert mp.encode(mp.Command.BODYEOB) == b"\0\0\0\x01E"
    with pytest.raises(ValueError):
        mp.encode_helo("bad\0name")
    with pytest.raises(ValueError):
        mp.encode_body(b"x" * (mp.CHUNK_SIZE + 1))


def test_replies_decode_across_any_cut_of_the_stream():
    stream = (reply(b"O", struct.pack("!III", 6, 0x111, 0x100702)) + reply(b"c")
              + reply(b"i", struct.pack("!I", 0) + b"DKIM-Signature\0 v=1;\n\ta=rsa\0")
              + reply(b"y", b"550 5.7.1 Virus found\0") + reply(b"a"))
    for step in (1, 2, 3, 7, len(stream)):
        decoder, got = mp.Decoder(), []
        for start in range(0, len(stream), step):
            got += decoder.feed(stream[start:start + step])
        assert decoder.pending == 0
        assert [r.kind for r in got] == [mp.Kind.OPTNEG, mp.Kind.CONTINUE, mp.Kind.INSHEADER,
                                         mp.Kind.REPLYCODE, mp.Kind.ACCEPT]
    negotiated = mp.decode_negotiation(got[0])
    assert (negotiated.version, negotiated.actions, negotiated.steps) == (6, 0x111, 0x100702)
    assert not negotiated.sends(mp.Command.HELO) and negotiated.sends(mp.Command.MAIL)
    assert got[2].name == b"DKIM-Signature" and got[2].value == b" v=1;\n\ta=rsa" and got[2].index == 0
    assert got[3].text == "550 5.7.1 Virus found" and got[3].code == 550


def test_negotiation_flags_say_which_steps_are_sent_and_answered():
    rspamd = mp.Negotiated(6, mp.ALL_ACTIONS, mp.Step(0xFF080))
    assert rspamd.sends(mp.Command.RCPT) and not rspamd.answers(mp.Command.RCPT)
    assert not rspamd.answers(mp.Command.HEADER) and rspamd.answers(mp.Command.BODYEOB)
    data = struct.pack("!III", 6, 0x1FF, 0) + struct.pack("!I", 2) + b"{auth_authen} i\0"
    negotiated = mp.decode_negotiation(mp.Reply(mp.Kind.OPTNEG, data=data))
    assert negotiated.macros == {mp.Command.MAIL: (b"{auth_authen}", b"i")}


@pytest.mark.parametrize("garbage, problem", [
    (b"\0\0\0\0", "length 0"),
    (struct.pack("!I", mp.MAX_PACKET + 1) + b"c", "out of range"),
    (reply(b"Z"), "unknown reply code"),
    (reply(b"y", b"250 all fine\0"), "REPLYCODE"),
    (reply(b"y", b"\0"), "REPLYCODE"),
    (reply(b"m", b"\0\0"), "CHGHEADER"),
    (reply(b"h", b"\0value\0"), "ADDHEADER"),
    (b"HTTP/1.1 400 Bad Request\r\n", "out of range"),
])
def test_garbage_is_a_protocol_error(garbage, problem):
    with pytest.raises(mp.ProtocolError, match=problem):
        mp.Decoder().feed(garbage)


def test_a_negotiation_we_cannot_speak_is_refused():
    for data in (struct.pack("!III", 7, 0, 0), struct.pack("!II", 6, 0),
                 struct.pack("!IIII", 6, 0, 0, 99) + b"i\0"):
        with pytest.raises(mp.ProtocolError):
            mp.decode_negotiation(mp.Reply(mp.Kind.OPTNEG, data=data))


def test_an_incomplete_packet_waits_for_the_rest():
    decoder = mp.Decoder()
    assert decoder.feed(reply(b"y", b"451 4.3.0 later\0")[:9]) == []
    assert decoder.pending == 9
    [answer] = decoder.feed(reply(b"y", b"451 4.3.0 later\0")[9:])
    assert answer.text == "451 4.3.0 later"


@pytest.mark.parametrize("address, expected", [
    ("inet:127.0.0.1:8891", ("127.0.0.1", 8891)),
    ("inet:8891@127.0.0.1", ("127.0.0.1", 8891)),
    ("inet:[::1]:8891", ("::1", 8891)),
    ("inet6:8891@::1", ("::1", 8891)),
    ("unix:/run/milter.sock", "/run/milter.sock"),
    ("local:/run/milter.sock", "/run/milter.sock"),
])
def test_milter_addresses_in_postfix_and_sendmail_forms(address, expected):
    assert parse_address(address)[1] == expected


@pytest.mark.parametrize("address", ["127.0.0.1:8891", "inet:127.0.0.1", "inet:host:0", "unix:relative",
                                     "tcp:127.0.0.1:1", "inet::8891"])
def test_bad_milter_addresses_are_refused(address):
    with pytest.raises(ValueError):
        parse_address(address)


def test_header_edits_keep_the_filters_form_and_cannot_inject_a_field():
    headers = Headers.parse(b"Received: x\r\nSubject: one\r\nX-A: 1\r\nX-A: 2\r\n")
    headers.insert(0, "DKIM-Signature", b" v=1;\n\tb=abc")
    headers.change("X-A", 2, b"two")
    headers.change("x-a", 1, None)
    headers.change("X-New", 3, b"added")
    headers.insert(99, "X-Last", b"x\nInjected: yes")
    assert headers.as_bytes() == (b"DKIM-Signature: v=1;\r\n\tb=abc\r\nReceived: x\r\nSubject: one\r\n"
                                  b"X-A: two\r\nX-New: added\r\nX-Last: x\r\n\tInjected: yes\r\n")
    assert "Injected" not in headers.names()


def test_a_replaced_body_is_spooled_and_replaces_the_old_one(tmp_path):
    transaction = Transaction(str(tmp_path), size_threshold=10)
    transaction.write(b"Subject: s\r\n\r\nold body\r\n")
    transaction.end_of_data()
    body = transaction.new_body()
    body.write(b"new body, longer than the threshold\r\n")
    transaction.replace_body(body)
    assert b"".join(transaction.message_chunks()) == b"Subject: s\r\n\r\nnew body, longer than the threshold\r\n"
    assert transaction.data_size == len(b"Subject: s\r\n\r\nnew body, longer than the threshold\r\n")
    assert list(tmp_path.iterdir())  # spilled to the spool directory, not held in memory
    transaction.close()
