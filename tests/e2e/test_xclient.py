"""XCLIENT and XFORWARD (plugins/xclient.py) over real sockets.

The real server runs in this process; raw clients connect from 127.0.0.1 (the trusted
upstream) and 127.0.0.2 (anyone else). Then a real Postfix (Debian's, a private instance
of qpgevent.testing.mta) relays to qpgevent with ``smtp_send_xforward_command = yes``: the
original client's address must reach our Received line and a plugin's view
(tests/data/plugins/client_stamp.py writes what it saw into the message).
"""

from __future__ import annotations

import contextlib
import smtplib
import sys
from pathlib import Path

import pytest

from qpgevent.testing import RawClient, maildir_messages, wait_until
from qpgevent.testing.mta import Postfix

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")


def plugins(hosts: str = "127.0.0.1") -> str:
    return (f"[[xclient]]\n  xclient_hosts = {hosts}\n  xforward_hosts = {hosts}\n[[client_stamp]]\n"
            "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n")


@contextlib.contextmanager
def raw_session(server, source: str):
    """A raw client from ``source``, past the greeting; closed afterwards."""
    client = RawClient(server, source=source)
    try:
        assert client.reply()[0] == 220
        yield client
    finally:
        client.close()


def ehlo(client: RawClient) -> list[str]:
    code, text = client.command("EHLO upstream.test")
    assert code == 250
    return text.splitlines()[1:]


def deliver(client: RawClient) -> None:
    assert client.command("MAIL FROM:<a@client.test>")[0] == 250
    assert client.command("RCPT TO:<bob@example.test>")[0] == 250
    assert client.command("DATA")[0] == 354
    assert client.command("Subject: hi\r\n\r\nhello\r\n.")[0] == 250


def only_message(server) -> bytes:
    messages = wait_until(lambda: maildir_messages(server.maildir), 30, "the message in the Maildir")
    assert len(messages) == 1
    return next(iter(messages.values()))


def test_a_trusted_upstream_is_offered_both_and_xclient_restarts_the_session(make_server):
    server = make_server(plugins(), plugin_dirs=PLUGIN_DIR)
    with raw_session(server, "127.0.0.1") as client:
        offered = ehlo(client)
        assert "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in offered
        assert "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE" in offered
        assert client.command("XCLIENT ADDR=BOGUS")[0] == 501
        code, text = client.command("XCLIENT NAME=mail.origin.test ADDR=192.0.2.7 PORT=4711 HELO=origin.test")
        assert code == 220 and "mx.example.test" in text
        # A new session: HELO/EHLO first, as after the greeting.
        assert client.command("MAIL FROM:<a@client.test>")[0] == 503
        assert "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in ehlo(client)
        deliver(client)
    message = only_message(server)
    assert b"(mail.origin.test [192.0.2.7])" in message
    assert b"X-Client-Seen: remote_ip=192.0.2.7 xforward=None" in message


def test_xclient_login_makes_an_authenticated_relay_client_and_waits_for_the_transaction(make_server):
    server = make_server(plugins(), plugin_dirs=PLUGIN_DIR)
    with raw_session(server, "127.0.0.1") as client:
        ehlo(client)
        assert client.command("MAIL FROM:<a@client.test>")[0] == 250
        assert client.command("XCLIENT ADDR=192.0.2.8")[0] == 503  # not inside a transaction
        assert client.command("RSET")[0] == 250
        assert client.command("XCLIENT ADDR=IPV6:2001:db8::8 NAME=[UNAVAILABLE] LOGIN=alice")[0] == 220
        ehlo(client)
        assert client.command("MAIL FROM:<a@client.test>")[0] == 250
        assert client.command("RCPT TO:<someone@elsewhere.test>")[0] == 250  # relaying: rcpt_ok says so
    with raw_session(server, "127.0.0.1") as client:
        ehlo(client)
        assert client.command("MAIL FROM:<a@client.test>")[0] == 250
        assert client.command("RCPT TO:<someone@elsewhere.test>")[0] != 250  # the upstream itself may not
    with raw_session(server, "127.0.0.1") as client:
        assert client.command("XCLIENT ADDR=192.0.2.9 LOGIN=alice")[0] == 220
        ehlo(client)
        deliver(client)
    message = only_message(server)
    assert b"(unknown [192.0.2.9])" in message and b"(authenticated as alice)" in message


def test_xclient_names_a_new_client_judged_afresh_at_connect(make_server):
    # The upstream is a relay client and whitelisted; neither carries over to the clients it
    # names. hosts_allow refuses 198.51.100.0/24 at connect: XCLIENT naming one gets that refusal.
    server = make_server(plugins() + "[[relay]]\n  clients = 127.0.0.1\n[[whitelist]]\n  hosts = 127.0.0.1\n"
                         "[[hosts_allow]]\n  rules = 198.51.100.0/24 DENY listed here\n[[show_notes]]\n[[recorder]]\n",
                         plugin_dirs=PLUGIN_DIR)
    events = sys.modules["qpgevent_plugins.recorder"].EVENTS  # the test plugin as the loader imported it
    events.clear()
    with raw_session(server, "127.0.0.1") as client:
        ehlo(client)
        assert client.command("HELP whitelisthost") == (214, "2.0.0 whitelisthost=True")
        assert client.command("MAIL FROM:<a@client.test>")[0] == 250
        assert client.command("RCPT TO:<someone@elsewhere.test>")[0] == 250  # the upstream may relay
        assert client.command("RSET")[0] == 250
        assert client.command("XCLIENT ADDR=192.0.2.7 NAME=[UNAVAILABLE]")[0] == 220
        # The upstream's session ended for the plugins (a milter or policy server would have
        # been told); the new client's is on.
        assert [event for event in events if event[0] == "disconnect"]
        offered = ehlo(client)
        assert "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT" in offered  # still the upstream's right
        assert client.command("HELP whitelisthost") == (214, "2.0.0 whitelisthost=None")
        assert client.command("MAIL FROM:<a@client.test>")[0] == 250
        assert client.command("RCPT TO:<someone@elsewhere.test>")[0] == 550  # 192.0.2.7 may not relay
        assert client.command("RSET")[0] == 250
        code, text = client.command("XCLIENT ADDR=198.51.100.9")
        assert (code, text) == (554, "5.7.1 listed here")
        assert client.is_closed_by_server()


def test_xforward_describes_the_next_message_only(make_server):
    server = make_server(plugins(), plugin_dirs=PLUGIN_DIR)
    with raw_session(server, "127.0.0.1") as client:
        ehlo(client)
        assert client.command("XFORWARD NAME=[UNAVAILABLE] ADDR=198.51.100.9 HELO=far+2Eaway.test")[0] == 250
        assert client.command("XFORWARD NOSUCH=1")[0] == 501
        deliver(client)
        assert client.command("MAIL FROM:<a@client.test>")[0] == 250
        assert client.command("XFORWARD ADDR=198.51.100.10")[0] == 503  # not inside a transaction
        assert client.command("RSET")[0] == 250
        assert client.command("XFORWARD ADDR=198.51.100.11")[0] == 250
        assert client.command("RSET")[0] == 250  # forgets it
        deliver(client)
    messages = wait_until(lambda: len(maildir_messages(server.maildir)) == 2 and maildir_messages(server.maildir),
                          30, "two messages in the Maildir")
    forwarded, plain = sorted(messages.values(), key=lambda message: b"198.51.100.9" not in message)
    assert b"Received: from far.away.test (unknown [198.51.100.9])" in forwarded
    assert b"X-Client-Seen: remote_ip=127.0.0.1 xforward=198.51.100.9" in forwarded
    assert b"X-Client-Seen: remote_ip=127.0.0.1 xforward=None" in plain and b"198.51.100.11" not in plain


def test_an_untrusted_client_gets_the_reply_of_any_unknown_verb(make_server):
    server = make_server(plugins(), plugin_dirs=PLUGIN_DIR)
    with raw_session(server, "127.0.0.2") as client:
        offered = ehlo(client)
        assert not [line for line in offered if line.startswith(("XCLIENT", "XFORWARD"))]
        unknown = client.command("XNOSUCHVERB x")
        assert unknown == (500, "5.5.1 Unrecognized command")
        assert client.command("XCLIENT ADDR=192.0.2.7") == unknown
        assert client.command("XFORWARD ADDR=192.0.2.7") == unknown
        deliver(client)
    message = only_message(server)
    assert b"[127.0.0.2]" in message and b"192.0.2.7" not in message


@pytest.fixture
def postfix_upstream(make_server):
    """qpgevent trusting 127.0.0.1 for XFORWARD, and a Postfix relaying everything to it."""
    server = make_server(plugins(), plugin_dirs=PLUGIN_DIR)
    instance = Postfix(["nobody@local.test"], main={
        "relayhost": f"[127.0.0.1]:{server.port}", "smtp_send_xforward_command": "yes",
        "smtp_bind_address": "127.0.0.1", "relay_domains": "example.test"})
    try:
        instance.start()
        yield server, instance
    finally:
        instance.cleanup()


def test_postfix_forwards_the_original_client_with_xforward(postfix_upstream):
    server, postfix = postfix_upstream
    with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="origin.client.test",
                      source_address=("127.0.0.5", 0), timeout=60) as smtp:
        smtp.sendmail("a@client.test", ["bob@example.test"], b"Subject: via postfix\r\n\r\nhello\r\n")
    message = only_message(server)
    ours = message.split(b"Received: ", 2)[1]  # the first Received header is ours
    assert ours.startswith(b"from origin.client.test (") and b"[127.0.0.5])" in ours
    assert b"X-Client-Seen: remote_ip=127.0.0.1 xforward=127.0.0.5" in message
