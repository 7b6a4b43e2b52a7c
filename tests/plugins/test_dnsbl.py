"""dnsbl through the real server and smtplib, against a real NSD on loopback.

Clients come from different loopback addresses (127.0.0.x: every one of them reaches
the server on Linux) so that one zone set serves every case; the IPv6 client is ::1.
Results and notes are read back with a probe plugin that answers ``VRFY result.dnsbl.<key>``.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import maildir_messages
from qpgevent.testing.dns import DeadDns, LoopbackDns, SlowDnsFront, blocklist_zone

ZONES = {
    **blocklist_zone("zen.test", {
        "127.0.0.2": ("127.0.0.2", "Listed: see http://zen.test/q?127.0.0.2"),
        "127.0.0.3": ("127.0.0.3", None),
        "127.0.0.4": ("127.0.0.4", "line one\nline two"),
        "127.0.0.8": ("127.255.255.254", "query refused: not a listing (RFC 5782 2.1)"),
        "127.0.0.9": ("127.0.0.2", "listed, but whitelisted elsewhere"),
        "127.0.0.11": ("127.0.0.2", "listed; the whitelist refuses the query"),
        "::1": ("127.0.0.2", "IPv6 loopback listed"),
    }),
    **blocklist_zone("score1.test", {"127.0.0.5": ("127.0.0.2", "score one"),
                                     "127.0.0.6": ("127.0.0.2", "score one again"),
                                     "127.0.0.10": ("127.0.0.2", None)}),
    **blocklist_zone("score2.test", {"127.0.0.6": ("127.0.0.3", "score two"),
                                     "127.0.0.7": ("127.0.0.3", "score two alone")}),
    **blocklist_zone("wl.test", {"127.0.0.9": ("127.0.2.1", None), "127.0.0.10": ("127.0.2.1", None),
                                 "127.0.0.11": ("127.0.0.255", None)}),  # dnswl.org: "refused"
    **blocklist_zone("clean.test", {"192.0.2.1": ("127.0.0.2", "someone else")}),
}
for _i in (1, 2, 3):  # three zones for the parallel test, each listing 127.0.0.2
    ZONES.update(blocklist_zone(f"slow{_i}.test", {"127.0.0.2": ("127.0.0.2", f"slow {_i}")}))

PROBE = '''"""probe: VRFY <note> answers repr(connection.notes.get(note)); VRFY result.<plugin>
[.key] the plugin's result in connection.results (its summary, or one piece of evidence). Tests only."""
from qpgevent.plugin import OK, Plugin


class Probe(Plugin):
    def hook_vrfy(self, session, argument):
        words = argument.split(".")
        if words[0] != "result":
            return OK, repr(session.connection.notes.get(argument))
        found = session.connection.results.get(words[1])
        if len(words) == 2:
            return OK, found.summary() if found is not None else "None"
        return OK, repr(found.get(words[2]) if found is not None else None)
'''

RCPT_AND_QUEUE = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


@pytest.fixture(scope="module")
def nsd():
    with LoopbackDns(ZONES, servfail_zones=("broken.test",)) as server:
        yield server


@pytest.fixture
def start(make_server, tmp_path, nsd):
    """``start(options, before="", **settings)``: the server with [[dnsbl]] options, the probe,
    rcpt_ok and maildir; ``before`` is plugin config placed ahead of dnsbl (relay...)."""
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "probe.py").write_text(PROBE)

    def start_server(options, before="", after="", **settings):
        plugins = f"{before}\n[[dnsbl]]\n{options}\n{after}\n[[probe]]\n{RCPT_AND_QUEUE}"
        # The server's own [dns] section: its resolver asks NSD (or what the test names).
        settings = {"dns_nameservers": "127.0.0.1", "dns_port": nsd.port, "dns_timeout": 2, **settings}
        return make_server(plugins=plugins, plugin_dirs=str(probes), **settings)

    return start_server


def greet(server, source="127.0.0.1"):
    """Connect from ``source``; (code, text, seconds) of the greeting; closes the connection."""
    client = smtplib.SMTP(timeout=20, source_address=(source, 0) if source else None)
    started = time.monotonic()
    try:
        code, text = client.connect(server.host, server.port)
    except smtplib.SMTPConnectError as refused:
        code, text = refused.smtp_code, refused.smtp_error
    finally:
        client.close()
    return code, text.decode(), time.monotonic() - started


def client_from(server, source):
    client = smtplib.SMTP(timeout=20, source_address=(source, 0), local_hostname="client.example.test")
    code, _ = client.connect(server.host, server.port)
    assert code == 220
    return client


def note(client, name):
    code, text = client.verify(name)
    assert code == 250, (code, text)
    return text.decode().removeprefix("2.1.5 ")


# -- listed or not, at connect ---------------------------------------------------------

def test_clean_client_is_greeted_and_its_mail_delivered(start):
    server = start("zones = zen.test, clean.test")
    with client_from(server, "127.0.0.1") as client:
        client.sendmail("a@sender.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        assert note(client, "result.dnsbl.refusal") == "None"
        assert note(client, "result.dnsbl.listings") == "None"
        assert note(client, "result.dnsbl") == "pass:zen.test,clean.test"
    assert len(maildir_messages(server.maildir)) == 1


def test_listed_client_is_refused_at_connect_with_the_txt_reason(start):
    server = start("zones = clean.test, zen.test")
    code, text, _ = greet(server, "127.0.0.2")
    assert (code, text) == (554, "5.7.1 127.0.0.2 is listed in zen.test: Listed: see http://zen.test/q?127.0.0.2")


def test_listing_without_txt_names_the_zone_once(start):
    server = start("zones = zen.test")
    assert greet(server, "127.0.0.3")[:2] == (554, "5.7.1 127.0.0.3 is listed in zen.test")


def test_a_reason_with_a_line_break_stays_on_one_reply_line(start):
    server = start("zones = zen.test")
    assert greet(server, "127.0.0.4")[:2] == (554, "5.7.1 127.0.0.4 is listed in zen.test: line one line two")


def test_answers_outside_127_0_0_0_8_or_in_the_error_range_are_not_listings(start):
    server = start("zones = zen.test")
    assert greet(server, "127.0.0.8")[0] == 220


def test_refusal_with_reject_type_disconnect_and_temp(start):
    assert greet(start("zones = zen.test\nreject_type = disconnect"), "127.0.0.2")[:2] == (
        554, "5.7.1 127.0.0.2 is listed in zen.test: Listed: see http://zen.test/q?127.0.0.2")
    code, text, _ = greet(start("zones = zen.test\nreject_type = temp"), "127.0.0.2")
    assert (code, text) == (421, "4.7.1 127.0.0.2 is listed in zen.test: Listed: see http://zen.test/q?127.0.0.2")


# -- IPv6 clients: the ip6.arpa-style nibble name (RFC 5782 2.4) -------------------------

def test_ipv6_client_listed_by_its_nibbles_is_refused(start):
    server = start("zones = zen.test", listen="[::1]:0")
    assert server.host == "::1"
    code, text, _ = greet(server, source=None)
    assert (code, text) == (554, "5.7.1 ::1 is listed in zen.test: IPv6 loopback listed")


def test_ipv6_client_not_listed_sends_mail(start):
    server = start("zones = clean.test, score1.test", listen="[::1]:0")
    client = smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=20)
    with client:
        client.sendmail("a@sender.test", ["b@example.test"], b"Subject: v6\r\n\r\nhello\r\n")
    assert len(maildir_messages(server.maildir)) == 1


# -- where the refusal happens ---------------------------------------------------------

def test_reject_at_rcpt_refuses_recipients_but_lets_postmaster_and_abuse_through(start):
    server = start("zones = zen.test\nreject_at = rcpt")
    with client_from(server, "127.0.0.2") as client:
        client.ehlo()
        assert client.mail("spammer@sender.test")[0] == 250
        code, text = client.rcpt("someone@example.test")
        assert (code, text.decode()) == (
            550, "5.7.1 127.0.0.2 is listed in zen.test: Listed: see http://zen.test/q?127.0.0.2")
        assert client.rcpt("postmaster@example.test")[0] == 250
        assert client.rcpt("<postmaster>")[0] == 250  # RFC 5321 4.5.1: no domain needed
        assert client.rcpt("Abuse@example.test")[0] == 250
        assert client.data(b"Subject: complaint\r\n\r\nplease delist me\r\n")[0] == 250
        assert note(client, "result.dnsbl.refusal").startswith("'127.0.0.2 is listed in zen.test")
    [message] = maildir_messages(server.maildir).values()
    assert b"please delist me" in message


def test_reject_at_rcpt_with_temp_type_and_own_exempt_list(start):
    server = start("zones = zen.test\nreject_at = rcpt\nreject_type = temp\nexempt_recipients = hostmaster")
    with client_from(server, "127.0.0.2") as client:
        client.ehlo()
        client.mail("a@sender.test")
        code, text = client.rcpt("postmaster@example.test")
        assert (code, text.decode()[:44]) == (450, "4.7.1 127.0.0.2 is listed in zen.test: Liste")
        assert client.rcpt("hostmaster@example.test")[0] == 250


def test_reject_0_only_notes_the_listing(start):
    server = start("zones = zen.test\nreject = 0")
    with client_from(server, "127.0.0.2") as client:
        client.sendmail("a@sender.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        assert note(client, "result.dnsbl.refusal") == repr(
            "127.0.0.2 is listed in zen.test: Listed: see http://zen.test/q?127.0.0.2")
        assert note(client, "result.dnsbl.listings") == repr({"zen.test": "Listed: see http://zen.test/q?127.0.0.2"})


def test_reject_naughty_defers_to_the_naughty_plugin(start):
    server = start("zones = zen.test\nreject = naughty")
    with client_from(server, "127.0.0.2") as client:
        assert note(client, "result.dnsbl.naughty") == repr(
            "5.7.1 127.0.0.2 is listed in zen.test: Listed: see http://zen.test/q?127.0.0.2")
        assert note(client, "result.dnsbl.naughty_reject_type") == "'perm'"


def test_reject_naughty_with_the_naughty_plugin_refuses_at_rcpt(start):
    server = start("zones = zen.test\nreject = naughty", after="[[naughty]]\n  reject_at = rcpt")
    with client_from(server, "127.0.0.2") as client:
        client.ehlo()
        assert client.mail("a@sender.test")[0] == 250
        code, text = client.rcpt("b@example.test")
    assert code == 550 and "127.0.0.2 is listed in zen.test" in text.decode()


def test_reject_naughty_defers_a_dns_failure_as_temporary(start):
    server = start("zones = broken.test\nreject = naughty")
    with client_from(server, "127.0.0.1") as client:
        assert note(client, "result.dnsbl.naughty") == repr("4.4.3 cannot check 127.0.0.1 against broken.test now, "
                                               "try again later")
        assert note(client, "result.dnsbl.naughty_reject_type") == "'temp'"


# -- who is not looked up, who is whitelisted ------------------------------------------

@pytest.fixture
def counter(nsd):
    """A front without delay in front of NSD: it counts the queries that reach the network."""
    with SlowDnsFront(nsd.port, delay=0) as front:
        yield front


def test_relay_clients_are_not_looked_up_without_lookahead(start, counter):
    server = start("zones = zen.test\nlookahead = no", before="[[relay]]\n  clients = 127.0.0.2",
                   dns_port=counter.port)
    assert greet(server, "127.0.0.2")[0] == 220
    assert counter.queries == 0


def test_relay_clients_asked_about_ahead_are_not_refused(start, counter):
    # 127.0.0.2 is listed in zen.test: asked at pre_connection (the question goes out while
    # the core looks up the client's name), the answer is not used.
    server = start("zones = zen.test", before="[[relay]]\n  clients = 127.0.0.2", dns_port=counter.port,
                   dns_reverse_lookup="yes", dns_cache_size=0)
    assert greet(server, "127.0.0.2")[0] == 220
    assert counter.queries >= 2  # the PTR and the blocklist


def test_allowed_networks_are_not_looked_up(start, counter):
    server = start("zones = zen.test\nallow = 127.0.0.0/30, 2001:db8::/32", dns_port=counter.port)
    assert greet(server, "127.0.0.2")[0] == 220
    assert counter.queries == 0
    assert greet(server, "127.0.0.4")[0] == 554
    assert counter.queries > 0


def test_whitelist_zone_beats_the_blocklists_and_makes_the_client_immune(start):
    # resolvable_fromhost would refuse this sender domain: immune clients are not checked.
    server = start("zones = zen.test\nwhitelist_zones = wl.test", after="[[resolvable_fromhost]]")
    with client_from(server, "127.0.0.9") as client:
        assert note(client, "whitelisthost") == "'wl.test'"
        client.sendmail("a@nowhere.clean.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert len(maildir_messages(server.maildir)) == 1
    # Not whitelisted: the same sender is refused (the resolver has no such domain).
    with client_from(server, "127.0.0.1") as client:
        client.ehlo()
        assert client.mail("a@nowhere.clean.test")[0] == 550


def test_a_whitelist_answer_ending_in_255_is_a_refused_query_not_a_listing(start):
    server = start("zones = zen.test\nwhitelist_zones = wl.test")
    assert greet(server, "127.0.0.11")[:2] == (554, "5.7.1 127.0.0.11 is listed in zen.test: listed; "
                                                    "the whitelist refuses the query")


def test_whitelist_zone_alone_only_sets_the_note(start):
    server = start("whitelist_zones = wl.test")
    with client_from(server, "127.0.0.10") as client:
        assert note(client, "whitelisthost") == "'wl.test'"
    with client_from(server, "127.0.0.2") as client:
        assert note(client, "whitelisthost") == "None"


# -- scores ---------------------------------------------------------------------------

def test_scores_add_up_and_refuse_at_the_threshold(start):
    server = start("zones = zen.test, score1.test:score=1, score2.test:score=2\nscore_threshold = 3")
    with client_from(server, "127.0.0.5") as client:
        assert note(client, "result.dnsbl.score") == "1.0"
        assert note(client, "result.dnsbl.listings") == repr({"score1.test": "score one"})
    with client_from(server, "127.0.0.7") as client:
        assert note(client, "result.dnsbl.score") == "2.0"
    code, text, _ = greet(server, "127.0.0.6")
    assert (code, text) == (554, "5.7.1 127.0.0.6 is listed in score1.test, score2.test (score 3, "
                                 "threshold 3): score one again; score two")
    with client_from(server, "127.0.0.1") as client:
        assert note(client, "result.dnsbl.score") == "0.0"


def test_scores_without_threshold_only_set_the_note(start):
    server = start("zones = score1.test:score=1.5, score2.test:score=2")
    with client_from(server, "127.0.0.6") as client:
        assert note(client, "result.dnsbl.score") == "3.5"
        assert note(client, "result.dnsbl.refusal") == "None"


def test_a_whitelisted_client_gets_no_score(start):
    server = start("zones = score1.test:score=5\nscore_threshold = 1\nwhitelist_zones = wl.test")
    with client_from(server, "127.0.0.10") as client:
        assert note(client, "whitelisthost") == "'wl.test'"
        assert note(client, "result.dnsbl.score") == "None"


# -- DNS failures ---------------------------------------------------------------------

def test_a_zone_that_fails_is_a_421_at_connect(start):
    server = start("zones = zen.test, broken.test")
    code, text, _ = greet(server, "127.0.0.1")
    assert (code, text) == (421, "4.4.3 cannot check 127.0.0.1 against broken.test now, try again later")


def test_a_known_listing_wins_over_a_zone_that_fails(start):
    server = start("zones = broken.test, zen.test")
    assert greet(server, "127.0.0.2")[0] == 554


def test_a_failing_score_zone_matters_only_with_a_threshold(start):
    assert greet(start("zones = zen.test, broken.test:score=1"), "127.0.0.1")[0] == 220
    assert greet(start("zones = zen.test, broken.test:score=1\nscore_threshold = 1"), "127.0.0.1")[0] == 421


def test_a_failing_whitelist_leaves_a_listed_client_undecided(start):
    server = start("zones = zen.test\nwhitelist_zones = broken.test")
    code, text, _ = greet(server, "127.0.0.2")
    assert (code, text) == (421, "4.4.3 cannot check 127.0.0.2 against broken.test now, try again later")
    assert greet(server, "127.0.0.1")[0] == 220  # nothing to excuse: the whitelist does not matter


def test_fail_open_lets_the_client_in(start):
    server = start("zones = broken.test\nfail_open = yes")
    with client_from(server, "127.0.0.1") as client:
        assert note(client, "result.dnsbl.error") == "'cannot check 127.0.0.1 against broken.test now'"
        assert note(client, "result.dnsbl") == "err:broken.test"
        client.sendmail("a@sender.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")


def test_a_dns_failure_is_deferred_to_rcpt_too(start):
    server = start("zones = broken.test\nreject_at = rcpt")
    with client_from(server, "127.0.0.1") as client:
        client.ehlo()
        client.mail("a@sender.test")
        code, text = client.rcpt("b@example.test")
        assert (code, text.decode()) == (450, "4.4.3 cannot check 127.0.0.1 against broken.test now, "
                                              "try again later")
        assert client.rcpt("postmaster@example.test")[0] == 250


def test_dead_nameserver_is_a_421_within_the_dns_timeout(start):
    with DeadDns() as dead:
        server = start("zones = zen.test, clean.test", dns_port=dead.port, dns_timeout=1.0)
        code, text, seconds = greet(server, "127.0.0.1")
    assert (code, text[:48]) == (421, "4.4.3 cannot check 127.0.0.1 against zen.test no")
    assert 0.9 <= seconds < 2.5, seconds


# -- parallel, not one after another ---------------------------------------------------

def test_three_zones_behind_a_1s_nameserver_take_1s_not_3s(start, nsd):
    with SlowDnsFront(nsd.port, delay=1.0) as front:
        server = start("zones = slow1.test, slow2.test, slow3.test", dns_port=front.port, dns_timeout=5.0,
                       dns_cache_size=0)
        code, _, seconds = greet(server, "127.0.0.1")
        assert code == 220
        assert front.queries == 3
        assert 1.0 <= seconds < 2.5, seconds
        # Listed in all three: the A queries at once, then the TXT queries at once; one
        # after another this would be 6 s.
        code, text, seconds = greet(server, "127.0.0.2")
        assert (code, text) == (554, "5.7.1 127.0.0.2 is listed in slow1.test: slow 1")
        assert front.queries == 3 + 6
        assert 2.0 <= seconds < 3.5, seconds


@pytest.mark.parametrize("lookahead, answers_before_the_blocklist_query", [("yes", 0), ("no", 1)])
def test_lookahead_asks_the_blocklist_while_the_core_looks_up_the_client_name(
        start, nsd, lookahead, answers_before_the_blocklist_query):
    with SlowDnsFront(nsd.port, delay=0.2) as front:
        server = start(f"zones = zen.test\nlookahead = {lookahead}", dns_port=front.port, dns_cache_size=0,
                       dns_reverse_lookup="yes")
        code, text, _ = greet(server, "127.0.0.3")
    assert (code, text) == (554, "5.7.1 127.0.0.3 is listed in zen.test")
    # The first query is the core's PTR look-up; the blocklist's A query comes second:
    # ahead, before the PTR answer is back; without lookahead, only after it.
    assert front.arrivals[0] == 0
    assert min(front.arrivals[1], 1) == answers_before_the_blocklist_query, front.arrivals


# -- configuration --------------------------------------------------------------------

@pytest.mark.parametrize("options, complaint", [
    ("zones = zen.test:score=high", "zones: 'zen.test:score=high' is not ZONE or ZONE:score=N"),
    ("zones = zen.test:reject", "zones: 'zen.test:reject' is not ZONE or ZONE:score=N"),
    ("zones = localhost", "zones: 'localhost' is not ZONE"),
    ("whitelist_zones = wl.test:score=1", "whitelist_zones: 'wl.test:score=1': a whitelist zone takes no score"),
    ("reject_at = data", "[[dnsbl]] reject_at: the value \"data\" is unacceptable"),
    ("score_threshold = -1", "[[dnsbl]] score_threshold: the value \"-1.0\" is too small"),
    ("allow = 127.0.0.x", "does not appear to be an IPv4 or IPv6 network"),
    ("zone = zen.test", "[[dnsbl]] zone: unknown option"),
])
def test_bad_options_stop_the_server_with_one_line(start, options, complaint):
    with pytest.raises(PluginLoadError) as error:
        start(options)
    assert complaint in str(error.value)
    assert "qpsmtpd.ini:" in str(error.value) and "\n" not in str(error.value)
