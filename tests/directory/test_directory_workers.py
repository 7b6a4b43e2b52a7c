"""The directory plugins in the real server process with two forked workers (``python -m qpgevent``)."""

from __future__ import annotations

from qpgevent.testing import maildir_messages, plugin_section as section

from directory_daemons import SUFFIX, LoopbackDovecot
from directory_smtp import rcpt_replies as rcpt


def test_rcpt_dovecot_and_rcpt_ldap_in_forked_workers(server_process, slapd):
    with LoopbackDovecot({"dana@dovecot.test": "dana-pw"}) as dovecot:
        forked(server_process, dovecot, slapd)


def forked(server_process, dovecot, slapd):
    plugins = (section("rcpt_dovecot", socket=dovecot.userdb_socket, domains=["dovecot.test"])
               + section("rcpt_ldap", uri=slapd.uri, base=SUFFIX, domains=["example.test"],
                         alias_attribute="mailRoutingAddress")
               + section("rcpt_ok", domains=["example.test", "dovecot.test"])
               + section("queue/maildir", path="Maildir", mailbox="%d/%l"))
    server = server_process(plugins, workers=2)
    for _ in range(4):  # several connections, whichever worker takes each
        assert [code for code, _ in rcpt(server, "dana@dovecot.test", "nobody@dovecot.test",
                                         "alice@example.test", "nobody@example.test")] == [250, 550, 250, 550]
    with server.smtp(timeout=30) as client:
        assert client.sendmail("sender@example.net", ["bob@example.test"], b"Subject: hi\r\n\r\nfor bob\r\n") == {}
    assert len(maildir_messages(server.maildir / "elsewhere.test" / "bob")) == 1
    assert server.terminate(20) == 0
