"""fcrdns, helo and naughty: every rule, through the real server and a real NSD on loopback.

The zones below are the whole world these tests see. Clients connect from 127.0.0.x
(their PTR records say who they are) or from ::1 to a server on [::1]; clients that
must not be on loopback come through the PROXY protocol from 127.0.0.1, the one trusted
proxy address, which lets a header name any client (203.0.113.5, 2001:db8::25).
Temporary DNS failures come from a SERVFAIL zone and from a nameserver that never
answers (DeadDns). Replies are checked as the client sees them (smtplib).
"""

from __future__ import annotations

import logging
import os
import smtplib
import socket
import time
from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing.dns import DeadDns, LoopbackDns, SlowDnsFront, ptr_zone_for

ZONES = {
    "example.test": {
        "mx": [("A", "127.0.0.1")],  # us: the server's `me` is mx.example.test
        "good": [("A", "127.0.0.2")],
        "liar": [("A", "192.0.2.99")],
        "near": [("A", "127.0.0.200")],  # the same /24 as 127.0.0.5, whose PTR it is
        "v6": [("AAAA", "::1")],
        "alias": [("A", "192.0.2.51")],  # not the client's, but in its PTR name's domain
        "mail6": [("AAAA", "2001:db8::25")],
        "nomatch6": [("AAAA", "2001:db8::99")],  # the /64 of 2001:db8::26, not the address
    },
    "other.test": {"host": [("A", "192.0.2.50")]},
    "xn--bcher-kva.test": {"mail": [("A", "127.0.0.7")]},  # mail.bücher.test
    **ptr_zone_for("127.0.0.0/8", {
        "127.0.0.1": "mx.example.test.",
        "127.0.0.2": "good.example.test.",
        "127.0.0.3": "liar.example.test.",
        # 127.0.0.4: no PTR at all
        "127.0.0.5": "near.example.test.",
        "127.0.0.6": "missing.example.test.",  # a PTR name without an address
        "127.0.0.7": "mail.xn--bcher-kva.test.",
    }),
    **ptr_zone_for("203.0.113.0/24", {"203.0.113.6": "liar.example.test."}),
    **ptr_zone_for("::/64", {"::1": "v6.example.test."}),
    **ptr_zone_for("2001:db8::/32", {"2001:db8::25": "mail6.example.test.",
                                     "2001:db8::26": "nomatch6.example.test."}),
}
#: roaming_user (stands in for AUTH) and show_notes (reads connection notes back).
TEST_PLUGINS = str(Path(__file__).resolve().parent.parent / "data" / "identity_plugins")
DELIVERY = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""
PROXY_IP = "127.0.0.1"


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES, servfail_zones=("broken.test",)) as server:
        yield server


@pytest.fixture
def start(make_server, nsd):
    """A server whose [dns] is the NSD above; ``plugins`` come before rcpt_ok and the queue."""

    def start(plugins, **settings):
        settings.setdefault("dns_nameservers", "127.0.0.1")
        settings.setdefault("dns_port", nsd.port)
        settings.setdefault("dns_timeout", 2)
        settings.setdefault("plugin_dirs", TEST_PLUGINS)
        return make_server(plugins + DELIVERY, **settings)

    return start


def session(server, source="127.0.0.2", proxied=None):
    """(smtplib client, greeting code, greeting text) for a session from ``source``.

    ``proxied``: the client a PROXY v1 header names (the session comes from 127.0.0.1,
    the trusted proxy, to our public address 192.0.2.25 or 2001:db8::1).
    """
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((PROXY_IP if proxied else source, 0))
    sock.connect((server.host, server.port))
    if proxied:
        v6 = ":" in proxied
        ours = "2001:db8::1" if v6 else "192.0.2.25"
        sock.sendall(f"PROXY TCP{6 if v6 else 4} {proxied} {ours} 40000 25\r\n".encode())
    client = smtplib.SMTP(local_hostname="client.example.test", timeout=10)
    client.command_encoding = "utf-8"  # UTF-8 HELO names (RFC 6531 3.3)
    client.sock, client._host = sock, server.host
    code, text = client.getreply()
    return client, code, text.decode()


def greeting(server, source="127.0.0.2", proxied=None):
    client, code, text = session(server, source, proxied)
    client.close()
    return code, text


def hello(server, name, source="127.0.0.2", proxied=None):
    """The reply to ``EHLO name`` in a new session."""
    client, code, _ = session(server, source, proxied)
    assert code == 220
    try:
        code, text = client.ehlo(name)
        return code, text.decode()
    finally:
        client.close()


def envelope(client, rcpt="bob@example.test"):
    """MAIL and RCPT replies, then the DATA reply if RCPT was accepted (a 354 is followed
    by a message, which must be queued)."""
    replies = [client.mail("a@client.test"), client.rcpt(rcpt)]
    if replies[-1][0] == 250:
        replies.append(client.docmd("DATA"))
        if replies[-1][0] == 354:
            client.send(b"Subject: test\r\n\r\nhello\r\n.\r\n")
            assert client.getreply()[0] == 250
    return [(code, text.decode()) for code, text in replies]


# -- fcrdns -------------------------------------------------------------------------------
FCRDNS = "[[fcrdns]]\n"


@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.7"])  # good.example.test, mail.bücher.test
def test_fcrdns_passes_a_confirmed_name(start, source):
    assert greeting(start(FCRDNS), source)[0] == 220


def test_fcrdns_refuses_an_address_without_ptr(start):
    assert greeting(start(FCRDNS), "127.0.0.4") == (554, "5.7.25 no reverse DNS for 127.0.0.4")


@pytest.mark.parametrize("source, name", [("127.0.0.3", "liar.example.test"),  # A elsewhere
                                          ("127.0.0.6", "missing.example.test")])  # no A
def test_fcrdns_refuses_a_name_that_does_not_give_the_address_back(start, source, name):
    assert greeting(start(FCRDNS), source) == (554, f"5.7.25 reverse DNS of {source} ({name}) is not confirmed")


def test_fcrdns_takes_an_address_of_the_same_24_unless_told_exact(start):
    assert greeting(start(FCRDNS), "127.0.0.5")[0] == 220  # near.example.test is 127.0.0.200
    exact = start("[[fcrdns]]\n  ipv4_prefix = 32\n")
    assert greeting(exact, "127.0.0.5")[0] == 554


def test_fcrdns_ipv6_client_over_ip6_arpa(start):
    server = start(FCRDNS, listen="[::1]:0")
    assert greeting(server, "::1")[0] == 220  # ::1 is v6.example.test, whose AAAA is ::1


@pytest.mark.parametrize("client, expected", [
    ("2001:db8::25", 220),  # mail6.example.test
    ("2001:db8::26", 220),  # nomatch6.example.test is 2001:db8::99: the same /64
    ("2001:db8::bad", 554),  # no PTR
    ("203.0.113.5", 554),  # not in its reverse zone
    ("203.0.113.6", 554),  # liar.example.test is 192.0.2.99
])
def test_fcrdns_clients_named_by_a_proxy(start, client, expected):
    server = start(FCRDNS, proxy_trusted=PROXY_IP)
    assert greeting(server, proxied=client)[0] == expected


def test_fcrdns_ipv6_exact_match_when_asked(start):
    server = start("[[fcrdns]]\n  ipv6_prefix = 128\n", proxy_trusted=PROXY_IP)
    assert greeting(server, proxied="2001:db8::26") == (
        554, "5.7.25 reverse DNS of 2001:db8::26 (nomatch6.example.test) is not confirmed")


def test_fcrdns_reject_0_only_logs(start, caplog):
    caplog.set_level(logging.INFO)
    server = start("[[fcrdns]]\n  reject = 0\n")
    assert greeting(server, "127.0.0.4")[0] == 220
    assert "fail, tolerated: 5.7.25 no reverse DNS for 127.0.0.4" in caplog.text


def test_fcrdns_reject_type_temp(start):
    server = start("[[fcrdns]]\n  reject_type = temp\n")
    assert greeting(server, "127.0.0.4") == (421, "4.7.25 no reverse DNS for 127.0.0.4")


def test_fcrdns_naughty_refuses_at_rcpt(start):
    server = start("[[fcrdns]]\n  reject = naughty\n[[naughty]]\n")
    client, code, _ = session(server, "127.0.0.4")
    with client:
        assert code == 220
        assert client.ehlo()[0] == 250
        assert envelope(client) == [(250, "2.1.0 <a@client.test>, sender OK - how exciting to get mail from you!"),
                                    (550, "5.7.25 no reverse DNS for 127.0.0.4")]


@pytest.mark.parametrize("reverse_lookup", ["yes", "no"])
def test_fcrdns_dead_dns_is_a_4xx_within_the_timeout(start, reverse_lookup):
    with DeadDns() as dead:
        server = start(FCRDNS, dns_port=dead.port, dns_timeout=0.5, reverse_lookup=reverse_lookup)
        started = time.monotonic()
        code, text = greeting(server, "127.0.0.2")
        elapsed = time.monotonic() - started
    assert (code, text) == (421, "4.7.25 cannot check your reverse DNS now, try again later")
    # With the core's look-up on, the plugin does not wait a second time.
    assert 0.45 <= elapsed < 0.95, elapsed


def test_fcrdns_asks_nothing_more_when_the_core_confirmed_the_name(start, nsd):
    with SlowDnsFront(nsd.port, delay=0) as counter:
        server = start(FCRDNS, dns_port=counter.port, reverse_lookup="yes", dns_cache_size=0)
        assert greeting(server, "127.0.0.2")[0] == 220
    assert counter.queries == 2  # the core's PTR and A; none of the plugin's own


def test_fcrdns_skips_relay_clients(start):
    server = start("[[relay]]\n  clients = 127.0.0.4\n" + FCRDNS)
    assert greeting(server, "127.0.0.4")[0] == 220


# -- helo: each rule ---------------------------------------------------------------------
def helo_plugin(**options):
    return "[[helo]]\n" + "".join(f"  {key} = {value}\n" for key, value in options.items())


@pytest.mark.parametrize("name", ["yahoo.com", "YAHOO.com", "spam42.example.test", "free.biz"])
def test_helo_badhelo_names_and_patterns(start, tmp_path, name):
    (tmp_path / "badhelo").write_text("# spammers' favourites\nyahoo.com\n\n\\.biz$  # regex\n")
    server = start(helo_plugin(badhelo=r'"^spam\d+\."', badhelo_file="badhelo"))
    code, text = hello(server, name)
    assert code == 550
    assert text in (f"5.7.1 I do not believe you are {name}.", "5.7.1 Your HELO hostname is not allowed")


def test_helo_badhelo_file_is_re_read_when_it_changes(start, tmp_path):
    listed = tmp_path / "badhelo"
    listed.write_text("yahoo.com\n")
    server = start(helo_plugin(badhelo_file="badhelo"))
    assert hello(server, "aol.com")[0] == 250
    listed.write_text("yahoo.com\naol.com\n")
    os.utime(listed, ns=(time.time_ns() + 10**9,) * 2)  # a new mtime even on a coarse clock
    assert hello(server, "aol.com")[0] == 550  # no restart, no reload signal
    listed.write_text("(unclosed\n")  # a broken file: the last good list stays in force
    os.utime(listed, ns=(time.time_ns() + 2 * 10**9,) * 2)
    assert hello(server, "aol.com")[0] == 550
    assert hello(server, "good.example.test")[0] == 250


def test_helo_badhelo_lets_others_through(start):
    server = start(helo_plugin(badhelo=r'yahoo.com, "^spam\d+\."'))
    assert hello(server, "good.example.test")[0] == 250
    assert hello(server, "spam.example.test")[0] == 250


def test_helo_badhelo_negated_pattern(start):
    server = start(helo_plugin(badhelo=r'"!\.example\.test$"'))
    assert hello(server, "good.example.test")[0] == 250
    assert hello(server, "good.other.test") == (550, "5.7.1 Your HELO hostname is not allowed")


def test_helo_badhelo_bad_regex_is_a_load_error(start):
    with pytest.raises(PluginLoadError, match=r"\[\[helo\]\] setup failed: badhelo pattern"):
        start(helo_plugin(badhelo='"(unclosed"'))


@pytest.mark.parametrize("name", ["127.0.0.2", "::1", "2001:db8::1"])
def test_helo_plain_ip(start, name):
    assert hello(start(helo_plugin()), name) == (
        550, "5.7.1 Plain IP is invalid HELO hostname (RFC 5321 4.1.3: write it in brackets)")


def test_helo_forged_literal(start):
    server = start(helo_plugin())
    assert hello(server, "[127.0.0.2]", "127.0.0.2")[0] == 250
    assert hello(server, "[127.0.0.9]", "127.0.0.2") == (550, "5.7.1 Forged IPs not accepted here")
    assert hello(server, "[IPv6:::1]", "127.0.0.2")[0] == 550


def test_helo_ipv6_literals(start):
    server = start(helo_plugin(), listen="[::1]:0")
    assert hello(server, "[IPv6:::1]", "::1")[0] == 250
    assert hello(server, "[IPv6:0:0:0:0:0:0:0:1]", "::1")[0] == 250
    assert hello(server, "[IPv6:2001:db8::1]", "::1") == (550, "5.7.1 Forged IPs not accepted here")


def test_helo_address_literal_refused_when_strict_even_the_right_one(start):
    server = start(helo_plugin(address_literal="yes"))
    assert hello(server, "[127.0.0.2]", "127.0.0.2") == (
        550, "5.7.1 RFC 5321 allows an address literal, but we do not")


@pytest.mark.parametrize("name", ["localhost", "LocalHost", "localhost.localdomain", "mail.localhost"])
def test_helo_localhost_from_elsewhere(start, name):
    server = start(helo_plugin(), proxy_trusted=PROXY_IP)
    assert hello(server, name, proxied="203.0.113.5") == (550, "5.7.1 You are not localhost")
    assert hello(server, name, proxied="2001:db8::25") == (550, "5.7.1 You are not localhost")


def test_helo_localhost_from_loopback_is_fine(start):
    assert hello(start(helo_plugin()), "localhost", "127.0.0.2")[0] == 250


def test_helo_claims_to_be_us(start):
    server = start(helo_plugin(our_names="relay.example.test"))
    assert hello(server, "mx.example.test", "127.0.0.2") == (550, "5.7.1 You are not mx.example.test")
    assert hello(server, "MX.Example.Test", "127.0.0.2")[0] == 550
    assert hello(server, "relay.example.test", "127.0.0.2")[0] == 550
    assert hello(server, "mx.example.test", "127.0.0.1")[0] == 250  # from our own address


def test_helo_claims_our_address(start):
    server = start(helo_plugin(forged_literal="no", plain_ip="no"))
    assert hello(server, "[127.0.0.1]", "127.0.0.2") == (550, "5.7.1 You are not mx.example.test")
    assert hello(server, "127.0.0.1", "127.0.0.2")[0] == 550
    server = start(helo_plugin(forged_literal="no"), proxy_trusted=PROXY_IP)
    assert hello(server, "[192.0.2.25]", proxied="203.0.113.5")[0] == 550  # our address behind the proxy


def test_helo_lenient_takes_what_rfc_refuses(start):
    server = start(helo_plugin())
    for name in ("my_pc", "localpc", "nowhere.example.test"):
        assert hello(server, name, "127.0.0.4")[0] == 250


@pytest.mark.parametrize("name", ["bad_name.example.test", "-dash.example.test", "dash-.example.test",
                                  "a..b.example.test", "ex\\065mple.test", "(comment).example.test",
                                  "trailing.example.test.", "x" * 64 + ".example.test", "[1.2.3]",
                                  "[Foo:bar]"])
def test_helo_invalid_syntax(start, name):
    server = start(helo_plugin(policy="rfc", no_forward_dns="no"))
    assert hello(server, name) == (550, "5.7.1 HELO name contains invalid FQDN characters. Read RFC 1035")


@pytest.mark.parametrize("name", ["good.example.test", "GOOD.example.test", "mail.bücher.test",
                                  "mail.xn--bcher-kva.test", "[127.0.0.2]"])
def test_helo_rfc_policy_passes_good_names(start, name):
    assert hello(start(helo_plugin(policy="rfc")), name, "127.0.0.2")[0] == 250


def test_helo_not_fqdn(start):
    assert hello(start(helo_plugin(policy="rfc")), "localpc") == (
        550, "5.7.1 HELO name is not fully qualified. Read RFC 5321")


def test_helo_no_forward_dns(start):
    server = start(helo_plugin(policy="rfc"))
    assert hello(server, "nowhere.example.test") == (550, "5.7.1 HELO hostname does not exist")
    assert hello(server, "nowhere.bücher.test")[0] == 550
    assert hello(server, "v6.example.test")[0] == 250  # an AAAA is enough, even for an IPv4 client


def test_helo_no_reverse_dns(start):
    server = start(helo_plugin(policy="rfc"))
    assert hello(server, "good.example.test", "127.0.0.4") == (550, "5.7.1 no reverse DNS for 127.0.0.4")


@pytest.mark.parametrize("name, expected", [
    ("good.example.test", 250),  # its A is the client's address
    ("alias.example.test", 250),  # its A is not, but the client's PTR name is in example.test
    ("host.other.test", 550),  # neither
])
def test_helo_no_matching_dns(start, name, expected):
    server = start(helo_plugin(policy="strict", ipv4_prefix=32))
    code, text = hello(server, name, "127.0.0.2")
    assert code == expected
    if expected == 550:
        assert text == "5.7.1 That HELO hostname fails FCrDNS"


def test_helo_no_matching_dns_forward_by_network(start):
    server = start(helo_plugin(no_matching_dns="yes"))
    # near.example.test is 127.0.0.200; 127.0.0.4 has no PTR: only the /24 can match.
    assert hello(server, "near.example.test", "127.0.0.4")[0] == 250
    assert hello(server, "host.other.test", "127.0.0.4")[0] == 550


def test_helo_strict_for_an_ipv6_client(start):
    server = start(helo_plugin(policy="strict", address_literal="no"), listen="[::1]:0")
    assert hello(server, "v6.example.test", "::1")[0] == 250
    assert hello(server, "mail6.example.test", "::1")[0] == 250  # PTR v6.example.test: same domain
    assert hello(server, "host.other.test", "::1") == (550, "5.7.1 That HELO hostname fails FCrDNS")


def test_helo_rule_switched_off_in_a_policy(start):
    server = start(helo_plugin(policy="strict", no_matching_dns="no", no_reverse_dns="no"))
    assert hello(server, "host.other.test", "127.0.0.4")[0] == 250


def test_helo_rule_switched_on_in_lenient(start):
    assert hello(start(helo_plugin(not_fqdn="yes")), "localpc")[0] == 550


def test_helo_temporary_dns_failure_is_450(start):
    server = start(helo_plugin(policy="rfc"))
    assert hello(server, "host.broken.test") == (450, "4.7.1 cannot check your HELO name now, try again later")


def test_helo_dead_dns_is_450_within_the_timeout(start):
    with DeadDns() as dead:
        server = start(helo_plugin(policy="rfc"), dns_port=dead.port, dns_timeout=0.5)
        client, code, _ = session(server)
        with client:
            started = time.monotonic()
            code, _ = client.ehlo("good.example.test")
            elapsed = time.monotonic() - started
    assert code == 450
    assert 0.45 <= elapsed < 0.95, elapsed


def test_helo_reject_0(start, caplog):
    caplog.set_level(logging.INFO)
    server = start(helo_plugin(policy="rfc", reject=0))
    assert hello(server, "nowhere.example.test")[0] == 250
    assert "fail, tolerated: HELO hostname does not exist" in caplog.text


def test_helo_reject_type_disconnect(start):
    server = start(helo_plugin(reject_type="disconnect"))
    client, _, _ = session(server)
    assert client.ehlo("[127.0.0.9]")[0] == 550
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()


def test_helo_plain_helo_is_checked_too(start):
    client, _, _ = session(start(helo_plugin()))
    with client:
        assert client.helo("127.0.0.2")[0] == 550


def test_helo_skips_relay_clients(start):
    server = start("[[relay]]\n  clients = 127.0.0.2\n" + helo_plugin(policy="strict"))
    assert hello(server, "127.0.0.9")[0] == 250


@pytest.mark.parametrize("name, forward, reverse", [
    ("good.example.test", True, True),
    ("alias.example.test", False, True),
    ("host.other.test", False, False),
])
def test_helo_records_the_matches_for_later_plugins(start, name, forward, reverse):
    server = start(helo_plugin(policy="strict", ipv4_prefix=32, reject=0)
                   + "[[show_notes]]\n  keys = result:helo:forward_match, result:helo:reverse_match\n")
    client, _, _ = session(server, "127.0.0.2")
    with client:
        assert client.ehlo(name)[0] == 250
        assert client.mail("a@client.test")[1].decode().startswith(
            f"4.7.1 notes: result:helo:forward_match={forward} result:helo:reverse_match={reverse} ")


# -- naughty ------------------------------------------------------------------------------
NAUGHTY_HELO = helo_plugin(reject="naughty")


def naughty_session(server, name="127.0.0.9", source="127.0.0.2"):
    client, code, _ = session(server, source)
    assert code == 220
    assert client.ehlo(name)[0] == 250  # deferred: the HELO is accepted
    return client


def test_naughty_refuses_at_rcpt_by_default_and_logs_the_envelope(start, caplog):
    caplog.set_level(logging.INFO)
    server = start(NAUGHTY_HELO + "[[naughty]]\n")
    with naughty_session(server) as client:
        assert envelope(client) == [(250, "2.1.0 <a@client.test>, sender OK - how exciting to get mail from you!"),
                                    (550, "5.7.1 Plain IP is invalid HELO hostname (RFC 5321 4.1.3: write it in brackets)")]
    assert "refusing at rcpt (perm): Plain IP is invalid" in caplog.text
    assert "from=<a@client.test> rcpt=<bob@example.test>" in caplog.text


def test_naughty_at_mail(start):
    server = start(NAUGHTY_HELO + "[[naughty]]\n  reject_at = mail\n")
    with naughty_session(server) as client:
        assert client.mail("a@client.test")[0] == 550


def test_naughty_at_data(start):
    server = start(NAUGHTY_HELO + "[[naughty]]\n  reject_at = data\n")
    with naughty_session(server) as client:
        replies = envelope(client)
    assert [code for code, _ in replies] == [250, 250, 554]
    assert replies[2][1].startswith("5.7.1 Plain IP is invalid")


def test_naughty_uses_the_reject_type_the_check_stored(start):
    server = start(helo_plugin(reject="naughty", reject_type="temp") + "[[naughty]]\n")
    with naughty_session(server) as client:
        assert envelope(client)[1][0] == 450


def test_naughty_disconnect(start):
    server = start(helo_plugin(reject="naughty", reject_type="disconnect") + "[[naughty]]\n")
    client = naughty_session(server)
    assert envelope(client)[1][0] == 550
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()


def test_naughty_first_refusal_wins(start):
    server = start("[[fcrdns]]\n  reject = naughty\n" + NAUGHTY_HELO + "[[naughty]]\n")
    with naughty_session(server, source="127.0.0.4") as client:
        assert envelope(client)[1] == (550, "5.7.25 no reverse DNS for 127.0.0.4")


def test_naughty_passes_clean_clients(start):
    server = start(NAUGHTY_HELO + "[[naughty]]\n")
    with naughty_session(server, name="good.example.test") as client:
        assert [code for code, _ in envelope(client)] == [250, 250, 354]


def test_naughty_reject_0_is_a_dry_run(start, caplog):
    caplog.set_level(logging.INFO)
    server = start(NAUGHTY_HELO + "[[naughty]]\n  reject = 0\n")
    with naughty_session(server) as client:
        assert [code for code, _ in envelope(client)] == [250, 250, 354]
    assert "fail, tolerated: Plain IP is invalid" in caplog.text


def test_naughty_refuses_at_data_when_rcpt_ok_came_first(start):
    # Listed after rcpt_ok, whose OK ends the rcpt hook: the refusal still comes, at DATA.
    server = start(NAUGHTY_HELO + "[[rcpt_ok:early]]\n  domains = example.test\n[[naughty]]\n")
    with naughty_session(server) as client:
        assert [code for code, _ in envelope(client)] == [250, 250, 554]


def test_naughty_lets_a_client_that_became_a_relay_client_through(start):
    # roaming_user stands in for AUTH (not built yet): it makes the client a relay
    # client at MAIL, after helo stored its refusal.
    server = start("[[roaming_user]]\n" + NAUGHTY_HELO + "[[naughty]]\n")
    with naughty_session(server) as client:
        assert client.mail("roaming@example.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
    with naughty_session(server) as client:
        assert client.mail("someone@example.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 550


def test_naughty_cannot_defer_to_itself(start):
    with pytest.raises(PluginLoadError, match="naughty is where deferred refusals end"):
        start("[[naughty]]\n  reject = naughty\n")

