"""The pure parts of qpgevent.smtp_client: routes, xtext, and DATA dot-stuffing.

Dot-stuffing is checked against smtplib's own (whole-message) encoding, with the message
cut into chunks at every kind of awkward place: between CR and LF, right before a dot.
"""

from __future__ import annotations

import random
import smtplib

import pytest

from qpgevent.address import Address
from qpgevent.smtp_client import (ClientFacts, ConfigurationError, Hop, Route, dot_stuffed, parse_routes,
                                  route_for, xtext)


def reference(message: bytes) -> bytes:
    """smtplib.SMTP.data's encoding of ``message``, final dot included.

    The one difference: an empty message is the final dot alone (smtplib sends an empty
    line first, which makes it a message of one empty line).
    """
    if not message:
        return b".\r\n"
    quoted = smtplib.quotedata(message.decode("latin-1")).encode("latin-1")
    if not quoted.endswith(b"\r\n"):
        quoted += b"\r\n"
    return quoted + b".\r\n"


CASES = [b"", b"x", b"x\r\n", b".", b".\r\n", b"..\r\n", b"a\r\n.b\r\n", b"a\n.b\n", b"a\r.b\r",
         b"\r\n\r\n.\r\n", b"line\r\n.", b"no end", b"x\r", b"\n", b"\r", b"\xc3\xa9\r\n.\xff\r\n"]


@pytest.mark.parametrize("message", CASES)
def test_dot_stuffing_matches_smtplib_whole(message):
    assert b"".join(dot_stuffed([message])) == reference(message)


@pytest.mark.parametrize("message", CASES)
def test_dot_stuffing_whatever_the_chunks(message):
    for cut in range(len(message) + 1):
        assert b"".join(dot_stuffed([message[:cut], message[cut:]])) == reference(message), cut
    assert b"".join(dot_stuffed([bytes([b]) for b in message])) == reference(message)


def test_dot_stuffing_random_messages_and_chunks():
    rng = random.Random(8)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"z" * 50]
    for _ in range(300):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        chunks, rest = [], message
        while rest:
            size = rng.randrange(1, 8)
            chunks.append(rest[:size])
            rest = rest[size:]
        assert b"".join(dot_stuffed(chunks)) == reference(message), message


def test_dot_stuffing_a_long_line_does_not_wait_for_its_end():
    line = b"." + b"x" * (200_000)
    out = list(dot_stuffed([line[i:i + 4096] for i in range(0, len(line), 4096)]))
    assert b"".join(out) == reference(line)
    assert max(len(block) for block in out) < 70_000  # held back at most ~64 KiB


def test_routes():
    routes = parse_routes(["example.test:127.0.0.1:2526", " *:smarthost ", ".sub.test:[::1]:26",
                           "lmtp.test:/run/dovecot/lmtp", "two.test:mx1:2525|[2001:db8::1]|/run/x"], 25)
    assert routes == [Route("example.test", (Hop("127.0.0.1", 2526),)), Route("*", (Hop("smarthost", 25),)),
                      Route(".sub.test", (Hop("::1", 26),)), Route("lmtp.test", (Hop("/run/dovecot/lmtp", 0),)),
                      Route("two.test", (Hop("mx1", 2525), Hop("2001:db8::1", 25), Hop("/run/x", 0)))]
    assert routes[-1].where == "mx1:2525|[2001:db8::1]:25|/run/x"
    assert route_for(routes, "Example.TEST").hops[0].host == "127.0.0.1"
    assert route_for(routes, "deep.sub.test").where == "[::1]:26"
    assert route_for(routes, "sub.test").where == "smarthost:25"  # .sub.test is for subdomains
    assert route_for(routes, "lmtp.test").hops[0].is_unix
    assert route_for(routes[:1], "elsewhere.test") is None
    # The same servers for two domains are one route (one pool, one transaction).
    assert Route("a.test", (Hop("h"),)) == Route("b.test", (Hop("h"),))


@pytest.mark.parametrize("bad", [[], ["example.test"], ["example.test:"], [":host:25"], ["x:host:port"],
                                 ["x:host:0"], ["x:host:70000"], ["x:[::1"], ["x:[::1]25"], ["x:a|"]])
def test_bad_routes(bad):
    with pytest.raises(ConfigurationError):
        parse_routes(bad, 25)


def test_xtext():
    assert xtext("client.example.test") == "client.example.test"
    assert xtext("a b+c=d") == "a+20b+2Bc+3Dd"
    assert xtext("\u00e9") == "+C3+A9"


def test_client_facts_attributes():
    facts = ClientFacts(addr="2001:db8::5", port=1234, helo="client.test", proto="ESMTP", login="bob",
                        ident="abc", destaddr="192.0.2.1", destport=25)
    assert facts.attributes("XCLIENT") == {
        "ADDR": "IPV6:2001:db8::5", "PORT": "1234", "NAME": "[UNAVAILABLE]", "HELO": "client.test",
        "PROTO": "ESMTP", "LOGIN": "bob", "DESTADDR": "192.0.2.1", "DESTPORT": "25"}
    assert facts.attributes("XFORWARD") == {
        "ADDR": "IPV6:2001:db8::5", "PORT": "1234", "NAME": "[UNAVAILABLE]", "HELO": "client.test",
        "PROTO": "ESMTP", "SOURCE": "REMOTE", "IDENT": "abc"}
    assert Address("bob", "example.test").format() == "<bob@example.test>"
