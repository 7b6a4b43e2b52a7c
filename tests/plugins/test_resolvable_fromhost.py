"""resolvable_fromhost through the real server and smtplib, against a real NSD on loopback.

Every way a sender domain can (not) receive mail, one name each in sender.test:
MX with A or AAAA targets, the implicit MX (RFC 5321 5.1), null MX (RFC 7505),
NXDOMAIN, no records, MX targets that are unusable, missing or failing.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import maildir_messages
from qpgevent.testing.dns import DeadDns, LoopbackDns, SlowDnsFront

ZONES = {
    "sender.test": {
        "mail": [("A", "192.0.2.25")],
        "mail6": [("AAAA", "2001:db8::25")],
        "localhost": [("A", "127.0.0.1"), ("AAAA", "::1")],
        "private": [("A", "10.1.2.3"), ("AAAA", "fd00::1")],
        "zero": [("A", "0.0.0.0")],
        "alias": [("CNAME", "mail.sender.test.")],
        "mx": [("MX", "10 mail.sender.test.")],
        "mx6": [("MX", "10 mail6.sender.test.")],
        "cname-mx": [("MX", "10 alias.sender.test.")],
        "implicit": [("A", "192.0.2.30")],
        "implicit6": [("AAAA", "2001:db8::30")],
        "null-mx": [("MX", "0 .")],
        "txt-only": [("TXT", '"v=spf1 -all"')],
        "local-mx": [("MX", "10 localhost.sender.test.")],
        "private-mx": [("MX", "10 private.sender.test."), ("MX", "20 zero.sender.test.")],
        "mixed-mx": [("MX", "10 localhost.sender.test."), ("MX", "20 mail.sender.test.")],
        "missing-mx": [("MX", "10 missing.sender.test.")],
        # MX records exist, so the domain's own A record is no fallback (RFC 5321 5.1).
        "mx-and-a": [("MX", "10 localhost.sender.test."), ("A", "192.0.2.40")],
        "implicit-local": [("A", "127.0.0.1")],
        "dot-and-mx": [("MX", "10 ."), ("MX", "20 mail.sender.test.")],
        "failing-mx": [("MX", "10 host.broken.test.")],
        "failing-and-local-mx": [("MX", "10 host.broken.test."), ("MX", "20 localhost.sender.test.")],
        "failing-and-good-mx": [("MX", "10 host.broken.test."), ("MX", "20 mail.sender.test.")],
        "three-mx": [("MX", "10 localhost.sender.test."), ("MX", "20 zero.sender.test."),
                     ("MX", "30 mail.sender.test.")],
    },
    # bücher.test and faß.test in their IDNA 2008 A-label forms.
    "xn--bcher-kva.test": {"@": [("MX", "10 mail.xn--bcher-kva.test.")], "mail": [("A", "192.0.2.80")]},
    "xn--fa-hia.test": {"@": [("A", "192.0.2.81")]},
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
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "probe.py").write_text(PROBE)

    def start_server(options="", before="", **settings):
        plugins = (f"{before}\n[[resolvable_fromhost]]\n{options}\n[[probe]]\n"
                   "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n")
        # The server's own [dns] section: its resolver asks NSD (or what the test names).
        settings = {"dns_nameservers": "127.0.0.1", "dns_port": nsd.port, "dns_timeout": 2, **settings}
        return make_server(plugins=plugins, plugin_dirs=str(probes), **settings)

    return start_server


@pytest.fixture
def server(start):
    return start()


def mail(server, sender, options=()):
    """(code, text) of MAIL FROM:<sender>."""
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=20) as client:
        client.ehlo()
        code, text = client.mail(sender, list(options))
        return code, text.decode()


def results_after_mail(server, sender, *keys, options=(), plugin="resolvable_fromhost"):
    """repr() of each piece of evidence ``keys`` of ``plugin``'s result once MAIL is accepted."""
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=20) as client:
        client.ehlo()
        assert client.mail(sender, list(options))[0] == 250
        return [client.verify(f"result.{plugin}.{key}")[1].decode().removeprefix("2.1.5 ") for key in keys]


# -- domains that can receive mail ---------------------------------------------------------

@pytest.mark.parametrize("domain, how, host", [
    ("mx.sender.test", "mx", "mail.sender.test"),
    ("mx6.sender.test", "mx", "mail6.sender.test"),  # an AAAA record is enough
    ("cname-mx.sender.test", "mx", "alias.sender.test"),
    ("mixed-mx.sender.test", "mx", "mail.sender.test"),  # one usable target is enough
    ("dot-and-mx.sender.test", "mx", "mail.sender.test"),  # "." beside others is no null MX
    ("failing-and-good-mx.sender.test", "mx", "mail.sender.test"),
    ("implicit.sender.test", "implicit mx", "implicit.sender.test"),
    ("implicit6.sender.test", "implicit mx", "implicit6.sender.test"),
])
def test_resolvable_domains_are_accepted(server, domain, how, host):
    assert results_after_mail(server, f"someone@{domain}", "how", "host") == [
        repr(how), repr(host)]


def test_mail_flows_end_to_end(server):
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=20) as client:
        client.sendmail("a@mx.sender.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert len(maildir_messages(server.maildir)) == 1


# -- domains that cannot --------------------------------------------------------------------

@pytest.mark.parametrize("domain, reply", [
    ("null-mx.sender.test",
     "5.7.27 sender domain null-mx.sender.test does not accept mail (null MX, RFC 7505)"),
    ("nowhere.sender.test",  # NXDOMAIN
     "5.1.8 sender domain nowhere.sender.test does not resolve: no MX, A or AAAA record"),
    ("txt-only.sender.test",  # the name exists, with no record that routes mail
     "5.1.8 sender domain txt-only.sender.test does not resolve: no MX, A or AAAA record"),
    ("local-mx.sender.test",
     "5.1.8 sender domain local-mx.sender.test has no usable MX: localhost.sender.test (127.0.0.1, ::1 unusable)"),
    ("private-mx.sender.test",
     "5.1.8 sender domain private-mx.sender.test has no usable MX: private.sender.test (10.1.2.3, fd00::1 "
     "unusable); zero.sender.test (0.0.0.0 unusable)"),
    ("missing-mx.sender.test",
     "5.1.8 sender domain missing-mx.sender.test has no usable MX: missing.sender.test (no address)"),
    ("mx-and-a.sender.test",
     "5.1.8 sender domain mx-and-a.sender.test has no usable MX: localhost.sender.test (127.0.0.1, ::1 unusable)"),
    ("implicit-local.sender.test",
     "5.1.8 sender domain implicit-local.sender.test has no MX and only unusable addresses: 127.0.0.1"),
])
def test_unresolvable_domains_are_refused(server, domain, reply):
    assert mail(server, f"someone@{domain}") == (550, reply)


def test_the_refusal_is_recorded_on_the_transaction_with_reject_0(start):
    server = start("reject = 0")
    assert results_after_mail(server, "a@null-mx.sender.test", "refusal") == [
        repr("sender domain null-mx.sender.test does not accept mail (null MX, RFC 7505)")]


def test_reject_type_temp_gives_450_with_a_4xx_status(start):
    server = start("reject_type = temp")
    assert mail(server, "a@nowhere.sender.test") == (
        450, "4.1.8 sender domain nowhere.sender.test does not resolve: no MX, A or AAAA record")
    assert mail(server, "a@null-mx.sender.test")[1].startswith("4.7.27 ")


def test_reject_naughty_defers_it(start):
    server = start("reject = naughty")
    assert results_after_mail(server, "a@nowhere.sender.test", "naughty") == [
        repr("5.1.8 sender domain nowhere.sender.test does not resolve: no MX, A or AAAA record")]


def test_max_mx_targets_bounds_the_targets_looked_up(start):
    assert mail(start(), "a@three-mx.sender.test")[0] == 250
    code, text = mail(start("max_mx_targets = 2"), "a@three-mx.sender.test")
    assert (code, text) == (550, "5.1.8 sender domain three-mx.sender.test has no usable MX: localhost.sender.test "
                                 "(127.0.0.1, ::1 unusable); zero.sender.test (0.0.0.0 unusable)")


def test_invalid_networks_can_be_changed(start):
    server = start("invalid_networks = 0.0.0.0/8")  # an intranet whose MXs are private
    assert mail(server, "a@private-mx.sender.test")[0] == 250
    assert mail(server, "a@local-mx.sender.test")[0] == 250
    assert mail(server, "a@zero.sender.test")[0] == 550


# -- not checked ----------------------------------------------------------------------------

def test_null_sender_and_relay_clients_are_not_checked(start):
    server = start()
    assert mail(server, "<>")[0] == 250
    server = start(before="[[relay]]\n  clients = 127.0.0.1, ::1")
    assert mail(server, "a@nowhere.sender.test")[0] == 250


@pytest.mark.parametrize("mode, sender, code", [
    ("skip", "a@[127.0.0.1]", 250),
    ("check", "a@[192.0.2.1]", 250),
    ("check", "a@[127.0.0.1]", 550),
    ("check", "a@[IPv6:2001:db8::1]", 250),
    ("check", "a@[IPv6:::1]", 550),
    ("reject", "a@[192.0.2.1]", 550),
])
def test_address_literals(start, mode, sender, code):
    assert mail(start(f"address_literals = {mode}"), sender)[0] == code


def test_address_literal_replies(start):
    assert mail(start("address_literals = check"), "a@[127.0.0.1]") == (
        550, "5.1.8 sender address literal [127.0.0.1] is not a usable address")
    assert mail(start("address_literals = reject"), "a@[192.0.2.1]") == (
        550, "5.1.8 sender address literal [192.0.2.1] not accepted: use a domain")


# -- IDN ----------------------------------------------------------------------------------

def test_idn_sender_domains_resolve_through_their_a_labels(server):
    assert results_after_mail(server, "user@bücher.test", "host", options=["SMTPUTF8"]) == [
        "'mail.xn--bcher-kva.test'"]
    # IDNA 2008: faß.test is xn--fa-hia.test (IDNA 2003 would have looked up fass.test).
    assert results_after_mail(server, "user@faß.test", "how", options=["SMTPUTF8"]) == [
        "'implicit mx'"]
    assert mail(server, "user@nirgendwö.sender.test", options=["SMTPUTF8"]) == (
        550, "5.1.8 sender domain xn--nirgendw-u4a.sender.test does not resolve: no MX, A or AAAA record")


# -- DNS failures --------------------------------------------------------------------------

@pytest.mark.parametrize("domain", ["x.broken.test", "failing-mx.sender.test", "failing-and-local-mx.sender.test"])
def test_dns_failures_are_a_450(server, domain):
    assert mail(server, f"a@{domain}") == (450, f"4.4.3 cannot resolve sender domain {domain} now, try again later")


def test_dns_failure_with_reject_0_passes(start):
    assert mail(start("reject = 0"), "a@x.broken.test")[0] == 250


def test_dead_nameserver_is_a_450_within_the_dns_timeout(start):
    with DeadDns() as dead:
        server = start(dns_port=dead.port, dns_timeout=1.0)
        started = time.monotonic()
        code, text = mail(server, "a@mx.sender.test")
        seconds = time.monotonic() - started
    assert (code, text) == (450, "4.4.3 cannot resolve sender domain mx.sender.test now, try again later")
    assert 0.9 <= seconds < 2.5, seconds


def test_mx_targets_are_looked_up_at_once(start, nsd):
    with SlowDnsFront(nsd.port, delay=0.5) as front:
        server = start(dns_port=front.port, dns_timeout=5.0, dns_cache_size=0)
        started = time.monotonic()
        assert mail(server, "a@three-mx.sender.test")[0] == 250
        seconds = time.monotonic() - started
    # MX, then A and AAAA of three targets at once: two round trips, not four (or seven).
    assert front.queries == 1 + 3 * 2
    assert 1.0 <= seconds < 1.9, seconds


@pytest.mark.parametrize("options, complaint", [
    ("address_literals = allow", "[[resolvable_fromhost]] address_literals: the value \"allow\" is unacceptable"),
    ("max_mx_targets = 0", "[[resolvable_fromhost]] max_mx_targets: the value \"0\" is too small"),
    ("invalid_networks = 127.0.0.0/33", "127.0.0.0/33"),
])
def test_bad_options_stop_the_server(start, options, complaint):
    with pytest.raises(PluginLoadError) as error:
        start(options)
    assert complaint in str(error.value)
