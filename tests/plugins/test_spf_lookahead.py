"""sender_permitted_from's lookahead: the SPF check starts at mail_pre, so its look-ups overlap
resolvable_fromhost's at MAIL; a path rewritten after mail_pre is checked again.

Real server, smtplib, a real NSD behind a slow front that notes, for each query, how many
answers it had sent when the query came (queries that run at once come before any answer).
"""

from __future__ import annotations

import pytest

from qpgevent.testing import maildir_messages
from qpgevent.testing.dns import LoopbackDns, SlowDnsFront

ZONES = {
    "sender.test": {"@": [("MX", "10 mail.sender.test."), ("TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')],
                    "mail": [("A", "192.0.2.25"), ("AAAA", "2001:db8::25")]},
    "other.test": {"@": [("MX", "10 mail.sender.test."), ("TXT", '"v=spf1 ip4:192.0.2.1 -all"')]},
}

REWRITER = '''"""rewrite: mail_pre turns every sender into mallory@other.test. Tests only."""
from qpgevent.plugin import DECLINED, Plugin


class Rewrite(Plugin):
    def hook_mail_pre(self, session, path, params):
        session.rewrite_sender("<mallory@other.test>")
        return DECLINED
'''


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES) as server:
        yield server


@pytest.fixture
def front(nsd):
    with SlowDnsFront(nsd.port, delay=0.2) as slow:
        yield slow


def start(make_server, front, spf_options="", after_spf="", plugin_dirs=None):
    plugins = (f"[[resolvable_fromhost]]\n[[sender_permitted_from]]\n{spf_options}\n{after_spf}\n"
               "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n")
    extra = {"plugin_dirs": str(plugin_dirs)} if plugin_dirs else {}
    return make_server(plugins=plugins, dns_nameservers="127.0.0.1", dns_port=front.port, dns_timeout=5,
                       dns_cache_size=0, **extra)


def send(server):
    with server.smtp(timeout=30) as client:
        client.ehlo("client.example.test")
        code, text = client.mail("alice@sender.test")
        if code == 250:
            client.rcpt("bob@example.test")
            code, text = client.data(b"Subject: hi\r\n\r\nhello\r\n")
    return code, text.decode()


@pytest.mark.parametrize("lookahead, answers_before_the_spf_query", [("yes", 0), ("no", 3)])
def test_the_spf_query_goes_out_with_the_mx_query(make_server, front, lookahead, answers_before_the_spf_query):
    server = start(make_server, front, f"  lookahead = {lookahead}")
    assert send(server)[0] == 250
    [mail] = maildir_messages(server.maildir).values()
    assert b"Received-SPF: pass " in mail
    # resolvable_fromhost: MX, then A and AAAA of the target; SPF: the TXT of sender.test,
    # ahead: beside the MX query, before any answer; in plugin order: after all three.
    assert front.queries == 4
    txt_arrival = front.arrivals[1] if lookahead == "yes" else front.arrivals[3]
    assert txt_arrival == answers_before_the_spf_query, front.arrivals


def test_a_sender_rewritten_after_mail_pre_is_checked_as_rewritten(make_server, front, tmp_path):
    (tmp_path / "rewrite.py").write_text(REWRITER)
    server = start(make_server, front, after_spf="[[rewrite]]", plugin_dirs=tmp_path)
    assert send(server) == (550, "5.7.1 SPF fail: 127.0.0.1 is not allowed to send mail for other.test")
