"""DSN parameters (RFC 3461): the xtext codec, and MAIL/RCPT parameters in the protocol core."""

from __future__ import annotations

import pytest

from qpgevent.core import dsn_request
from qpgevent.core.address import Address
from qpgevent.core.protocol import Mail, Rcpt, Rejected, SmtpProtocol
from qpgevent.core.reply import reply

OK = reply(250, "2.0.0", "OK")
HELLO = reply(250, None, "mx.example.test Hi there")


@pytest.mark.parametrize("text, encoded", [
    ("user@example.test", "user@example.test"),
    ("a+b=c d", "a+2Bb+3Dc+20d"),
    ("caf\u00e9", "caf+C3+A9"),
])
def test_xtext_round_trip(text, encoded):
    assert dsn_request.xtext(text) == encoded
    assert dsn_request.unxtext(encoded) == text


@pytest.mark.parametrize("bad", ["", "a b", "a=b", "a+2", "a+2b", "a+ZZ", "+FF"])
def test_unxtext_refuses_what_is_not_xtext(bad):
    with pytest.raises(dsn_request.XtextError):
        dsn_request.unxtext(bad)


def test_notify_and_orcpt_values():
    assert dsn_request.notify_of("success,Failure") == ("SUCCESS", "FAILURE")
    assert dsn_request.notify_of("NEVER") == ("NEVER",)
    for bad in ("NEVER,SUCCESS", "SUCCESS,SUCCESS", "", "SOMETIMES", "SUCCESS,"):
        with pytest.raises(dsn_request.XtextError):
            dsn_request.notify_of(bad)
    assert dsn_request.orcpt_of("RFC822;b+2Bx@example.test") == "rfc822;b+x@example.test"
    for bad in ("rfc822", "rfc822;", ";a@b", "rfc 822;a@b", "rfc822;a b"):
        with pytest.raises(dsn_request.XtextError):
            dsn_request.orcpt_of(bad)


def command(line: bytes, state_lines=(b"EHLO client.test",)) -> object:
    protocol = SmtpProtocol()
    for previous in state_lines:
        protocol.receive_data(previous + b"\r\n")
        protocol.next_event()
        protocol.send(HELLO if previous.startswith(b"EHLO") else OK)
    protocol.receive_data(line + b"\r\n")
    return protocol.next_event()


def test_valid_dsn_parameters_reach_the_commands():
    mail = command(b"MAIL FROM:<a@client.test> RET=hdrs ENVID=QQ+2B1")
    assert isinstance(mail, Mail) and mail.params == {"RET": "hdrs", "ENVID": "QQ+2B1"}
    rcpt = command(b"RCPT TO:<b@example.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@example.test",
                   (b"EHLO client.test", b"MAIL FROM:<a@client.test>"))
    assert isinstance(rcpt, Rcpt) and rcpt.params["NOTIFY"] == "SUCCESS,DELAY"


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a@client.test> RET=BODY",
    b"MAIL FROM:<a@client.test> RET",
    b"MAIL FROM:<a@client.test> ENVID=a+zz",
    b"MAIL FROM:<a@client.test> ENVID=" + b"x" * 101,
    b"MAIL FROM:<a@client.test> RET=FULL RET=HDRS",  # repeated
    b"MAIL FROM:<a@client.test> ENVID=a ENVID=b",
])
def test_bad_or_repeated_mail_parameters_get_501(line):
    event = command(line)
    assert isinstance(event, Rejected) and event.reply.code == 501 and event.reply.enhanced == "5.5.4"


@pytest.mark.parametrize("params", [b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=", b"ORCPT=b@example.test",
                                    b"NOTIFY=FAILURE NOTIFY=DELAY", b"ORCPT=rfc822;a ORCPT=rfc822;b"])
def test_bad_or_repeated_rcpt_parameters_get_501(params):
    event = command(b"RCPT TO:<b@example.test> " + params, (b"EHLO client.test", b"MAIL FROM:<a@client.test>"))
    assert isinstance(event, Rejected) and event.reply.code == 501
    assert event.reply.enhanced == "5.5.4"


def test_the_dsn_request_does_not_change_what_an_address_is():
    plain = Address.parse("<b@example.test>")
    asked = Address("b", "example.test", notify=("NEVER",), orcpt="rfc822;b@example.test")
    assert asked == plain and hash(asked) == hash(plain) and asked.notify == ("NEVER",)


# -- the request passed on to a next hop that offers DSN ----------------------------------------------
@pytest.mark.parametrize("ret, envid, params", [
    (None, None, []),
    ("hdrs", None, ["RET=HDRS"]),
    ("FULL", "QQ314+1", ["RET=FULL", "ENVID=QQ314+2B1"]),
    (None, "a=b c", ["ENVID=a+3Db+20c"]),
])
def test_mail_parameters_carry_ret_and_envid_as_xtext(ret, envid, params):
    assert dsn_request.mail_parameters(ret, envid) == params


@pytest.mark.parametrize("notify, orcpt, params", [
    (None, None, []),
    (("NEVER",), None, ["NOTIFY=NEVER"]),
    (("SUCCESS", "FAILURE"), "rfc822;a+alias@example.test",
     ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a+2Balias@example.test"]),
    (None, "rfc822;caf\u00e9=1@example.test", ["ORCPT=rfc822;caf+C3+A9+3D1@example.test"]),
])
def test_rcpt_parameters_carry_notify_and_orcpt_with_its_address_as_xtext(notify, orcpt, params):
    assert dsn_request.rcpt_parameters(notify, orcpt) == params
    # What the core reads back from them is what was queued.
    for param in params:
        key, _, value = param.partition("=")
        assert dsn_request.problem(key, value) is None
        if key == "ORCPT":
            assert dsn_request.orcpt_of(value) == orcpt
