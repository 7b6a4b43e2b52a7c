"""The sans-I/O core's STARTTLS and AUTH: sequencing, discarded plaintext, SASL lines."""

from __future__ import annotations

import base64

import pytest

from qpgevent.config import Listen, parse_listen
from qpgevent.core.protocol import NEED_DATA, Auth, AuthResponse, Mail, Noop, Rejected, SmtpProtocol, Starttls, State
from qpgevent.core.reply import Canned, reply

OK = reply(250, "2.0.0", "OK")


def greeted() -> SmtpProtocol:
    protocol = SmtpProtocol()
    protocol.receive_data(b"EHLO c.test\r\n")
    protocol.next_event()
    protocol.send(OK)
    return protocol


def event(protocol: SmtpProtocol, line: bytes):
    protocol.receive_data(line)
    return protocol.next_event()


def test_starttls_discards_everything_pipelined_after_it():
    protocol = greeted()
    protocol.receive_data(b"STARTTLS\r\nMAIL FROM:<x@y.test>\r\nRCPT TO:<a@b.test>\r\nDA")
    assert isinstance(protocol.next_event(), Starttls)
    protocol.send(Canned.READY_FOR_TLS)
    assert protocol.next_event() is NEED_DATA  # nothing survives, not even half a line
    assert protocol.state is State.NEED_HELLO and not protocol.esmtp
    assert event(protocol, b"TA\r\n").verb == "TA"  # "DA" + "TA" never became DATA


def test_starttls_refused_keeps_the_input():
    protocol = greeted()
    protocol.receive_data(b"STARTTLS\r\nNOOP\r\n")
    protocol.next_event()
    protocol.send(Canned.TLS_NOT_OFFERED)
    assert isinstance(protocol.next_event(), Noop)


@pytest.mark.parametrize("line,expected", [
    (b"STARTTLS now", Canned.NO_ARGUMENTS),
    (b"AUTH", Canned.SYNTAX),
    (b"AUTH PLAIN a b", Canned.SYNTAX),
    (b"AUTH PLAIN ====", Canned.BAD_BASE64),
    (b"AUTH PLAIN YQ", Canned.BAD_BASE64),  # unpadded
])
def test_malformed(line, expected):
    protocol = greeted()
    got = event(protocol, line + b"\r\n")
    assert isinstance(got, Rejected) and got.reply == expected


def test_sequencing():
    protocol = SmtpProtocol()
    assert event(protocol, b"AUTH PLAIN\r\n").reply == Canned.SAY_EHLO_FIRST
    protocol.send(Canned.SAY_EHLO_FIRST)
    assert event(protocol, b"STARTTLS\r\n").reply == Canned.SAY_EHLO_FIRST
    protocol.send(Canned.SAY_EHLO_FIRST)
    protocol = greeted()
    assert isinstance(event(protocol, b"MAIL FROM:<a@b.test> AUTH=<>\r\n"), Mail)  # RFC 4954 5
    protocol.send(OK)
    assert event(protocol, b"AUTH PLAIN\r\n").reply == Canned.NOT_IN_TRANSACTION
    protocol.send(Canned.NOT_IN_TRANSACTION)
    assert event(protocol, b"STARTTLS\r\n").reply == Canned.NOT_IN_TRANSACTION


def test_auth_exchange_reads_sasl_lines_not_commands():
    protocol = greeted()
    auth = event(protocol, b"AUTH LOGIN\r\n")
    assert isinstance(auth, Auth) and (auth.mechanism, auth.initial) == ("LOGIN", None)
    protocol.send(reply(334, None, "VXNlcm5hbWU6"))
    response = event(protocol, base64.b64encode(b"QUIT") + b"\r\n")  # a user called QUIT
    assert response == AuthResponse(b"QUIT")
    protocol.send(reply(334, None, "UGFzc3dvcmQ6"))
    assert event(protocol, b"*\r\n").reply == Canned.AUTH_CANCELLED
    protocol.send(Canned.AUTH_CANCELLED)
    assert isinstance(event(protocol, b"AUTH PLAIN =\r\n"), Auth)  # back to commands; "=" is empty
    protocol.send(reply(235, "2.7.0", "ok"))
    assert protocol.authenticated
    assert event(protocol, b"AUTH PLAIN\r\n").reply == Canned.ALREADY_AUTHENTICATED


def test_auth_lines_may_be_12288_octets_other_commands_512():
    protocol = greeted()
    blob = base64.b64encode(b"x" * 9000)
    got = event(protocol, b"AUTH PLAIN " + blob + b"\r\n")
    assert isinstance(got, Auth) and len(got.initial) == 9000
    protocol.send(reply(535, "5.7.8", "no"))
    assert event(protocol, b"NOOP " + b"x" * 600 + b"\r\n").reply == Canned.COMMAND_TOO_LONG
    protocol.send(Canned.COMMAND_TOO_LONG)
    assert event(protocol, b"AUTH PLAIN " + b"A" * 13000 + b"\r\n").reply == Canned.COMMAND_TOO_LONG


def test_listen_flags():
    assert parse_listen("127.0.0.1:25") == Listen("127.0.0.1", 25)
    assert parse_listen(":465/smtps") == Listen("0.0.0.0", 465, implicit_tls=True, submission=True)
    assert parse_listen("[::1]:587/submission+plainauth") == Listen("::1", 587, submission=True, plain_auth=True)
    with pytest.raises(ValueError, match="unknown"):
        parse_listen(":25/bogus")
