"""rcpt_dovecot: recipients checked against a real Dovecot userdb (auth-userdb socket, USER lookups)."""

from __future__ import annotations

import gevent
import pytest

from qpgevent.address import Address
from qpgevent.testing import maildir_messages

from directory_daemons import LoopbackDovecot
from directory_smtp import rcpt_replies as rcpt


def plugins(socket: str, *extra: str) -> str:
    options = "".join(f"  {line}\n" for line in extra)
    return (f"[[rcpt_dovecot]]\n  socket = {socket}\n  domains = example.test\n{options}"
            "[[rcpt_ok]]\n  domains = example.test, other.test\n[[queue/maildir]]\n  path = Maildir\n")


def test_known_recipient_accepted_unknown_refused_other_domains_left_alone(make_server, dovecot):
    server = make_server(plugins(dovecot.userdb_socket))
    assert rcpt(server, "dana@example.test", "Eve@Example.TEST", "nobody@example.test", "anyone@other.test") == [
        (250, b"2.1.5 <dana@example.test>, recipient ok"),
        (250, b"2.1.5 <Eve@example.test>, recipient ok"),  # looked up in lower case
        (550, b"5.1.1 nobody@example.test: no such user here"),
        (250, b"2.1.5 <anyone@other.test>, recipient ok"),  # not ours to check: rcpt_ok says
    ]
    with server.smtp(timeout=30) as client:
        client.sendmail("sender@example.net", ["dana@example.test"], b"Subject: hi\r\n\r\nknown\r\n")
    assert len(maildir_messages(server.maildir)) == 1


def test_lookup_by_local_part(make_server):
    with LoopbackDovecot({"dana": "pw"}) as keyed_by_name:
        server = make_server(plugins(keyed_by_name.userdb_socket, "lookup = localpart"))
        assert [code for code, _ in rcpt(server, "dana@example.test", "eve@example.test")] == [250, 550]


@pytest.mark.parametrize("on_failure, expected", [
    ("tempfail", (451, b"4.4.3 Recipient cannot be verified now, try again later")),
    ("reject", (550, b"5.4.3 Recipient cannot be verified (directory failure)")),
    ("accept", (250, b"2.1.5 <eve@example.test>, recipient ok")),
])
def test_dovecot_down_gets_the_configured_fallback(make_server, dovecot, on_failure, expected):
    server = make_server(plugins(dovecot.userdb_socket, f"on_failure = {on_failure}", "cache_ttl = 0",
                                 "negative_ttl = 0"))
    dovecot.stop()
    assert rcpt(server, "eve@example.test") == [expected]
    dovecot.start()
    assert rcpt(server, "eve@example.test")[0][0] == 250


def test_answers_are_cached_within_the_ttl_failures_are_not(make_server, dovecot):
    server = make_server(plugins(dovecot.userdb_socket, "cache_ttl = 600", "negative_ttl = 600"))
    assert [code for code, _ in rcpt(server, "dana@example.test", "nobody@example.test")] == [250, 550]
    dovecot.stop()
    # Served from the cache while Dovecot is down; a name never asked is a fallback (451).
    assert [code for code, _ in rcpt(server, "dana@example.test", "nobody@example.test", "eve@example.test")] \
        == [250, 550, 451]
    dovecot.start()
    assert [code for code, _ in rcpt(server, "eve@example.test")] == [250]  # the 451 was not cached


def test_hung_dovecot_gets_451_after_the_timeout_and_other_sessions_go_on(make_server, dovecot):
    server = make_server(plugins(dovecot.userdb_socket, "lookup_timeout = 5"))
    dovecot.pause()
    waiting = gevent.spawn(rcpt, server, "dana@example.test")
    assert rcpt(server, "anyone@other.test")[0][0] == 250  # another session, meanwhile
    assert not waiting.ready()
    assert waiting.get(timeout=30) == [(451, b"4.4.3 Recipient cannot be verified now, try again later")]
    dovecot.resume()
    assert rcpt(server, "dana@example.test")[0][0] == 250


def test_garbage_from_the_socket_is_a_failure(make_server, nonsense):
    server = make_server(plugins(nonsense()))
    assert rcpt(server, "dana@example.test") == [(451, b"4.4.3 Recipient cannot be verified now, try again later")]


def test_nul_in_a_recipient_is_unknown(plugin_harness, dovecot):
    # SMTP cannot carry a NUL (the server refuses control characters): the plugin is asked directly.
    harness = plugin_harness("rcpt_dovecot", socket=dovecot.userdb_socket)
    assert harness.run_hook("rcpt", Address("dana\0", "example.test"), {}).reply.code == 550
    assert harness.run_hook("rcpt", "<dana@example.test>").reply.code == 250
