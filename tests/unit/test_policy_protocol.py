"""The Postfix policy delegation protocol codec (qpgevent.policy_protocol), bytes in, values out."""

from __future__ import annotations

import pytest

from qpgevent.policy_protocol import MAX_REPLY, Kind, ProtocolError, ReplyReader, encode_request, parse_action


def test_a_request_is_name_value_lines_and_an_empty_line_without_line_breaks_in_values():
    assert encode_request({"request": "smtpd_access_policy", "helo_name": "a\r\nb"}) == \
        b"request=smtpd_access_policy\nhelo_name=a b\n\n"


def test_replies_are_found_as_they_arrive_and_what_follows_is_kept():
    reader = ReplyReader()
    reader.feed(b"action=DUN")
    assert reader.next_reply() is None
    reader.feed(b"NO\n\naction=OK\n")
    assert reader.next_reply() == {"action": "DUNNO"}
    assert reader.next_reply() is None
    reader.feed(b"\n")
    assert reader.next_reply() == {"action": "OK"}


@pytest.mark.parametrize("data", [b"hello\n\n", b"=x\n\n", b"x" * (MAX_REPLY + 1)])
def test_garbage_replies_are_protocol_errors(data):
    reader = ReplyReader()
    reader.feed(data)
    with pytest.raises(ProtocolError):
        reader.next_reply()


@pytest.mark.parametrize("text,kind,reply", [
    ("REJECT", Kind.REJECT, "554 5.7.1 Access denied"),
    ("reject go away", Kind.REJECT, "554 5.7.1 go away"),
    ("DEFER", Kind.DEFER, "450 4.7.1 Try again later"),
    ("DEFER_IF_PERMIT 4.2.0 Greylisted", Kind.DEFER, "450 4.2.0 Greylisted"),
    ("550 5.7.23 SPF fail", Kind.REJECT, "550 5.7.23 SPF fail"),
    ("421 closing", Kind.DEFER, "421 4.7.1 closing"),
])
def test_refusals_carry_a_code_and_an_enhanced_status(text, kind, reply):
    action = parse_action(text)
    assert (action.kind, action.reply) == (kind, reply)


@pytest.mark.parametrize("text,kind,argument", [
    ("OK", Kind.OK, ""), ("permit", Kind.OK, ""), ("DUNNO", Kind.DUNNO, ""),
    ("PREPEND Received-SPF: Pass x ", Kind.PREPEND, "Received-SPF: Pass x"),
    ("REDIRECT a@example.test", Kind.REDIRECT, "a@example.test"), ("HOLD", Kind.HOLD, ""),
    ("DISCARD spam", Kind.DISCARD, "spam"), ("FILTER smtp:[::1]:25", Kind.FILTER, "smtp:[::1]:25"),
    ("BCC b@example.test", Kind.BCC, "b@example.test"), ("WARN hm", Kind.WARN, "hm"),
    ("DEFER_IF_REJECT later", Kind.DEFER_IF_REJECT, "later"),
])
def test_the_other_actions(text, kind, argument):
    action = parse_action(text)
    assert (action.kind, action.text) == (kind, argument)


@pytest.mark.parametrize("text", ["", "FROBNICATE", "550", "PREPEND", "PREPEND no colon here", "REDIRECT",
                                  "600 what", "45 short"])
def test_actions_postfix_would_not_take_are_protocol_errors(text):
    with pytest.raises(ProtocolError):
        parse_action(text)
