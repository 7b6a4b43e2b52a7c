"""rhsbl through the real server and smtplib, against a real NSD on loopback.

The sender's domain and the HELO name are looked up at MAIL; IDN domains in their
A-label form (the zone below is written that way, so the test states the encoding).
"""

from __future__ import annotations

import smtplib
import time

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import maildir_messages
from qpgevent.testing.dns import DeadDns, LoopbackDns, SlowDnsFront

ZONES = {
    "dbl.test": {
        "spam.test": [("A", "127.0.1.2"), ("TXT", '"spam domain, see http://dbl.test/spam.test"')],
        "bad-helo.test": [("A", "127.0.1.3"), ("TXT", '"HELO of a botnet"')],
        "notxt.test": [("A", "127.0.1.2")],
        # bücher.test (IDNA 2008 A-label); faß.test stays clean (IDNA 2003 would say fass.test).
        "xn--bcher-kva.test": [("A", "127.0.1.2"), ("TXT", '"IDN spam"')],
        "fass.test": [("A", "127.0.1.2"), ("TXT", '"listed only under its IDNA 2003 name"')],
        "refused.test": [("A", "127.255.255.254"), ("TXT", '"public resolver refused"')],
    },
    "dbl2.test": {"other.test": [("A", "127.0.1.2")]},
    "dbl3.test": {"other.test": [("A", "127.0.1.2")]},
}

PROBE = '''"""probe: VRFY result.<plugin>.<key> answers repr() of that evidence in the transaction's
results, else the connection's. Tests only."""
from qpgevent.plugin import OK, Plugin


class Probe(Plugin):
    def hook_vrfy(self, session, argument):
        _, plugin, key = argument.split(".")
        transaction = session.current_transaction
        for results in ([transaction.results] if transaction is not None else []) + [session.connection.results]:
            found = results.get(plugin)
            if found is not None and key in found.evidence:
                return OK, repr(found[key])
        return OK, "None"
'''


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES, servfail_zones=("broken.test",)) as server:
        yield server


@pytest.fixture
def start(make_server, tmp_path, nsd):
    """``start(options, before="", **settings)``: [[rhsbl]] with options, the probe, rcpt_ok, maildir."""
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "probe.py").write_text(PROBE)

    def start_server(options, before="", **settings):
        plugins = (f"{before}\n[[rhsbl]]\n{options}\n[[probe]]\n"
                   "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n")
        # The server's own [dns] section: its resolver asks NSD (or what the test names).
        settings = {"dns_nameservers": "127.0.0.1", "dns_port": nsd.port, "dns_timeout": 2, **settings}
        return make_server(plugins=plugins, plugin_dirs=str(probes), **settings)

    return start_server


def session(server, helo="client.example.test"):
    client = smtplib.SMTP(server.host, server.port, local_hostname=helo, timeout=20)
    client.ehlo()
    return client


def mail(server, sender, helo="client.example.test", options=()):
    """(code, text) of MAIL FROM:<sender> after EHLO ``helo``."""
    with session(server, helo) as client:
        code, text = client.mail(sender, list(options))
        return code, text.decode()


def test_clean_sender_and_helo_send_mail(start):
    server = start("zones = dbl.test, dbl2.test")
    with session(server) as client:
        client.sendmail("a@clean.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert len(maildir_messages(server.maildir)) == 1


def test_listed_sender_domain_is_refused_with_the_txt_reason(start):
    server = start("zones = dbl2.test, dbl.test")
    assert mail(server, "a@spam.test") == (
        550, "5.7.1 sender domain spam.test is listed in dbl.test: spam domain, see http://dbl.test/spam.test")
    assert mail(server, "a@SPAM.Test")[0] == 550  # domains are case-insensitive


def test_listed_helo_name_is_refused_at_mail(start):
    server = start("zones = dbl.test")
    assert mail(server, "a@clean.test", helo="bad-helo.test") == (
        550, "5.7.1 HELO name bad-helo.test is listed in dbl.test: HELO of a botnet")


def test_null_sender_skips_the_domain_but_not_the_helo(start):
    server = start("zones = dbl.test")
    assert mail(server, "<>")[0] == 250
    assert mail(server, "<>", helo="bad-helo.test")[0] == 550


def test_check_sender_only_or_helo_only(start):
    server = start("zones = dbl.test\ncheck = sender")
    assert mail(server, "a@clean.test", helo="bad-helo.test")[0] == 250
    assert mail(server, "a@spam.test")[0] == 550
    server = start("zones = dbl.test\ncheck = helo")
    assert mail(server, "a@spam.test")[0] == 250
    assert mail(server, "a@clean.test", helo="bad-helo.test")[0] == 550


def test_listing_without_txt_names_the_zone(start):
    server = start("zones = dbl.test")
    assert mail(server, "a@notxt.test") == (550, "5.7.1 sender domain notxt.test is listed in dbl.test")


def test_error_range_answers_are_not_listings(start):
    server = start("zones = dbl.test")
    assert mail(server, "a@refused.test")[0] == 250


def test_idn_sender_domain_is_looked_up_as_its_a_label(start):
    server = start("zones = dbl.test")
    assert mail(server, "user@bücher.test", options=["SMTPUTF8"]) == (
        550, "5.7.1 sender domain xn--bcher-kva.test is listed in dbl.test: IDN spam")
    assert mail(server, "user@BÜCHER.test", options=["SMTPUTF8"])[0] == 550  # UTS 46 mapping
    # IDNA 2008: faß.test is xn--fa-hia.test, not fass.test (listed): clean.
    with session(server) as client:
        client.sendmail("user@faß.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n",
                        mail_options=["SMTPUTF8"])
    assert len(maildir_messages(server.maildir)) == 1


def test_address_literals_and_ip_helo_names_are_not_looked_up(start, nsd):
    with SlowDnsFront(nsd.port, delay=0) as counter:
        server = start("zones = dbl.test", dns_port=counter.port)
        assert mail(server, "a@[192.0.2.1]", helo="[127.0.0.1]")[0] == 250
        assert mail(server, "a@[IPv6:2001:db8::1]", helo="127.0.0.1")[0] == 250
        assert counter.queries == 0
        assert mail(server, "a@clean.test", helo="[127.0.0.1]")[0] == 250
        assert counter.queries == 1


def test_relay_clients_are_immune(start):
    server = start("zones = dbl.test", before="[[relay]]\n  clients = 127.0.0.0/8")
    assert mail(server, "a@spam.test", helo="bad-helo.test")[0] == 250


def test_reject_0_and_naughty_only_record(start):
    server = start("zones = dbl.test\nreject = 0")
    with session(server) as client:
        assert client.mail("a@spam.test")[0] == 250
        assert client.verify("result.rhsbl.refusal")[1].decode().startswith(
            "2.1.5 'sender domain spam.test is listed in dbl.test")
    server = start("zones = dbl.test\nreject = naughty")
    with session(server) as client:
        assert client.mail("a@spam.test")[0] == 250
        assert client.verify("result.rhsbl.naughty")[1].decode().startswith(
            "2.1.5 '5.7.1 sender domain spam.test is listed in dbl.test")


def test_reject_type_temp_is_a_450_with_a_4xx_status(start):
    server = start("zones = dbl.test\nreject_type = temp")
    assert mail(server, "a@notxt.test") == (450, "4.7.1 sender domain notxt.test is listed in dbl.test")


def test_a_zone_that_fails_is_a_450_unless_a_listing_decides(start):
    server = start("zones = broken.test, dbl.test")
    assert mail(server, "a@clean.test") == (
        450, "4.4.3 cannot check clean.test against broken.test now, try again later")
    assert mail(server, "a@spam.test")[0] == 550


def test_fail_open_and_reject_0_let_a_dns_failure_pass(start):
    assert mail(start("zones = broken.test\nfail_open = yes"), "a@clean.test")[0] == 250
    assert mail(start("zones = broken.test\nreject = 0"), "a@clean.test")[0] == 250


def test_dead_nameserver_is_a_450_within_the_dns_timeout(start):
    with DeadDns() as dead:
        server = start("zones = dbl.test", dns_port=dead.port, dns_timeout=1.0)
        with session(server) as client:
            started = time.monotonic()
            code, text = client.mail("a@clean.test")
            seconds = time.monotonic() - started
    assert (code, text.decode()[:36]) == (450, "4.4.3 cannot check clean.test agains")
    assert 0.9 <= seconds < 2.5, seconds


def test_three_zones_two_names_behind_a_1s_nameserver_take_1s(start, nsd):
    with SlowDnsFront(nsd.port, delay=1.0) as front:
        server = start("zones = dbl.test, dbl2.test, dbl3.test", dns_port=front.port, dns_timeout=5.0,
                       dns_cache_size=0)
        with session(server, helo="helo.clean.test") as client:
            started = time.monotonic()
            assert client.mail("a@clean.test")[0] == 250
            seconds = time.monotonic() - started
    assert front.queries == 6  # 3 zones x (sender domain, HELO name), one after another: 6 s
    assert 1.0 <= seconds < 2.5, seconds


def test_ipv6_client(start):
    server = start("zones = dbl.test", listen="[::1]:0")
    assert mail(server, "a@spam.test")[0] == 550
    assert mail(server, "a@clean.test")[0] == 250


@pytest.mark.parametrize("options, complaint", [
    ("zones = dbl.test:score=1", "zones: 'dbl.test:score=1' is not a DNS zone name"),
    ("check = sender, body", "check: body: write sender, helo or both"),
    ("fail_open = maybe", "[[rhsbl]] fail_open: the value \"maybe\" is of the wrong type"),
])
def test_bad_options_stop_the_server(start, options, complaint):
    with pytest.raises(PluginLoadError) as error:
        start(options)
    assert complaint in str(error.value)
