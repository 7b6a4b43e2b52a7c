"""The list-driven policy plugins, every rule, through the real server in this process.

badmailfrom, badrcptto, badmailfromto, rcpt_map, rcpt_regexp, whitelist, bogus_bounce
and loadcheck keep no shared state, so they run once (the store-backed plugins run
on both backends in test_policy_greylisting/karma/limit.py). List files are edited
while the server runs: a change is seen at the next command.
"""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import RawClient, maildir_messages

from policy_helpers import ACCEPT, MESSAGE, greeting, mail_rcpt, rcpt, section, send, smtp_from

PLUGIN_DIR = str(Path(__file__).resolve().parents[1] / "data" / "plugins")


def touch_later(path: Path) -> None:
    """Make the change visible even on a coarse clock: move the mtime a second on."""
    stamp = os.stat(path).st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))


def mail(server, sender: str, source: str | None = None) -> tuple[int, bytes]:
    with smtp_from(server, source) as client:
        client.ehlo()
        return client.mail(sender)


def show(client: smtplib.SMTP, note: str) -> str:
    code, text = client.docmd("HELP", note)
    assert code == 214, (code, text)
    return text.decode().split(" ", 1)[1]


# -- badmailfrom ------------------------------------------------------------------------

BADMAILFROM = section("badmailfrom", list='"spammer@bad.example", "@junk.example go away", "other.example", '
                      r'"/^bulk\d+@/ no bulk mail", "^promo-", "<> no bounces here"') + ACCEPT


@pytest.mark.parametrize("sender, reply", [
    ("spammer@bad.example", b"5.7.1 Your envelope sender is in my badmailfrom list"),
    ("SPAMMER@Bad.Example", b"5.7.1 Your envelope sender is in my badmailfrom list"),
    ("anyone@junk.example", b"5.7.1 go away"),
    ("anyone@other.example", b"5.7.1 Your envelope sender is in my badmailfrom list"),
    ("bulk42@any.example", b"5.7.1 no bulk mail"),
    ("promo-spring@any.example", b"5.7.1 Your envelope sender is in my badmailfrom list"),
    ("", b"5.7.1 no bounces here"),
])
def test_badmailfrom_refuses_listed_senders(make_server, sender, reply):
    server = make_server(BADMAILFROM)
    assert mail(server, sender) == (550, reply)


@pytest.mark.parametrize("sender", ["friend@bad.example", "spammer@sub.bad.example", "x@sub.junk.example",
                                    "bulk@x.example", "my-promo-@x.example", "a@client.test"])
def test_badmailfrom_passes_other_senders(make_server, sender):
    server = make_server(BADMAILFROM)
    assert mail(server, sender)[0] == 250


def test_badmailfrom_file_is_reread_when_it_changes(make_server, tmp_path):
    listed = tmp_path / "badmailfrom"
    listed.write_text("# senders we refuse\nfirst@bad.example   # no reason given\n/@second\\.example$/ second\n")
    server = make_server(section("badmailfrom", file="badmailfrom") + ACCEPT)
    assert mail(server, "first@bad.example")[0] == 550
    assert mail(server, "x@second.example") == (550, b"5.7.1 second")
    listed.write_text("@third.example\n")
    touch_later(listed)
    assert mail(server, "first@bad.example")[0] == 250
    assert mail(server, "x@third.example")[0] == 550


def test_badmailfrom_keeps_its_list_when_the_file_vanishes_or_breaks(make_server, tmp_path):
    listed = tmp_path / "badmailfrom"
    listed.write_text("@bad.example\n")
    server = make_server(section("badmailfrom", file="badmailfrom") + ACCEPT)
    listed.write_text("/unclosed(/\n")
    touch_later(listed)
    assert mail(server, "x@bad.example")[0] == 550  # a bad edit: the previous list stays
    listed.unlink()
    assert mail(server, "x@bad.example")[0] == 550  # gone: the previous list stays
    listed.write_text("@other.example\n")
    assert mail(server, "x@bad.example")[0] == 250  # back and good: used
    assert mail(server, "x@other.example")[0] == 550


@pytest.mark.parametrize("options, message", [
    ({"list": '"/unclosed(/"'}, "bad regex"),
    ({"file": "missing-file"}, "missing-file"),
])
def test_badmailfrom_bad_list_is_a_load_error(make_server, options, message):
    with pytest.raises(PluginLoadError, match=message):
        make_server(section("badmailfrom", **options) + ACCEPT)


def test_badmailfrom_reject_options(make_server):
    server = make_server(section("badmailfrom", list="@bad.example", reject_type="temp") + ACCEPT)
    assert mail(server, "x@bad.example") == (450, b"4.7.1 Your envelope sender is in my badmailfrom list")
    server = make_server(section("badmailfrom", list="@bad.example", reject="0") + ACCEPT)
    assert mail(server, "x@bad.example")[0] == 250


def test_badmailfrom_does_not_check_relay_clients_or_whitelisted_senders(make_server):
    server = make_server(section("relay", clients="127.0.0.2") + section("whitelist", senders="boss@bad.example")
                         + section("badmailfrom", list="@bad.example") + ACCEPT)
    assert mail(server, "x@bad.example")[0] == 550
    assert mail(server, "x@bad.example", source="127.0.0.2")[0] == 250
    assert mail(server, "boss@bad.example")[0] == 250


# -- badrcptto ------------------------------------------------------------------------------

BADRCPTTO = section("badrcptto", list='"gone@example.test", "@closed.example.test", '
                    '"/^noreply@/ this address takes no mail"') + ACCEPT


@pytest.mark.parametrize("recipient, reply", [
    ("gone@example.test", (550, b"5.7.1 mail to gone@example.test not accepted here")),
    ("Gone@Example.Test", (550, b"5.7.1 mail to Gone@example.test not accepted here")),
    ("x@closed.example.test", (550, b"5.7.1 mail to x@closed.example.test not accepted here")),
    ("noreply@example.test", (550, b"5.7.1 this address takes no mail")),
    ("bob@example.test", (250, b"2.1.5 <bob@example.test>, recipient ok")),
])
def test_badrcptto_rules(make_server, recipient, reply):
    server = make_server(BADRCPTTO)
    assert rcpt(server, recipient) == reply


def test_badrcptto_file_is_reread_and_refusals_do_not_end_the_transaction(make_server, tmp_path):
    listed = tmp_path / "badrcptto"
    listed.write_text("first@example.test\n")
    server = make_server(section("badrcptto", file="badrcptto") + ACCEPT)
    assert [code for code, _ in mail_rcpt(server, "a@client.test", ["first@example.test", "bob@example.test"])] \
        == [550, 250]
    listed.write_text("second@example.test\n")
    touch_later(listed)
    assert rcpt(server, "first@example.test")[0] == 250
    assert rcpt(server, "second@example.test")[0] == 550


def test_badrcptto_relay_clients_are_not_checked(make_server):
    server = make_server(section("relay", clients="127.0.0.2") + BADRCPTTO)
    assert rcpt(server, "gone@example.test", source="127.0.0.2")[0] == 250


# -- badmailfromto ------------------------------------------------------------------------------

def test_badmailfromto_refuses_listed_pairs_only(make_server, tmp_path):
    (tmp_path / "badmailfromto").write_text("ex@partner.example bob@example.test\n")
    server = make_server(section("badmailfromto", list='"@spam.example carol@example.test"', file="badmailfromto")
                         + ACCEPT)
    replies = mail_rcpt(server, "ex@partner.example", ["bob@example.test", "carol@example.test"])
    assert replies == [(550, b"5.7.1 mail to bob@example.test not accepted here"),
                       (250, b"2.1.5 <carol@example.test>, recipient ok")]
    assert [c for c, _ in mail_rcpt(server, "x@spam.example", ["bob@example.test", "carol@example.test"])] == [250, 550]
    assert [c for c, _ in mail_rcpt(server, "friend@partner.example", ["bob@example.test"])] == [250]


def test_badmailfromto_needs_pairs(make_server):
    with pytest.raises(PluginLoadError, match="SENDER RECIPIENT"):
        make_server(section("badmailfromto", list='"lonely@example.test"') + ACCEPT)


# -- rcpt_map ------------------------------------------------------------------------------

def write_map(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


MAP = "# the users of example.org\nme@example.org  OK\nYou            OK\ninfo@example.org DENY User not found.\n" \
      "later@example.org DENYSOFT Mailbox moving, try tomorrow\n"


def rcpt_map_server(make_server, tmp_path, **options):
    write_map(tmp_path / "map_example_org", MAP)
    options = {"domain": "example.org", "file": "map_example_org", **options}
    return make_server(section("rcpt_map", **options) + ACCEPT)


@pytest.mark.parametrize("recipient, reply", [
    ("me@example.org", (250, b"2.1.5 <me@example.org>, recipient ok")),
    ("ME@EXAMPLE.ORG", (250, b"2.1.5 <ME@example.org>, recipient ok")),
    ("you@example.org", (250, b"2.1.5 <you@example.org>, recipient ok")),  # a local part alone
    ("info@example.org", (550, b"5.7.1 User not found.")),
    ("later@example.org", (450, b"4.7.1 Mailbox moving, try tomorrow")),
    ("nobody@example.org", (550, b"5.7.1 No such user.")),  # the default
    ("bob@example.test", (250, b"2.1.5 <bob@example.test>, recipient ok")),  # other domains: rcpt_ok
    ("me@elsewhere.test", (550, b"5.7.1 Relaying denied")),
])
def test_rcpt_map_rules(make_server, tmp_path, recipient, reply):
    server = rcpt_map_server(make_server, tmp_path)
    assert rcpt(server, recipient) == reply


def test_rcpt_map_default_option_with_underscores(make_server, tmp_path):
    server = rcpt_map_server(make_server, tmp_path, default='"DENYSOFT=Mailbox_not_ready,_try_later"')
    assert rcpt(server, "nobody@example.org") == (450, b"4.7.1 Mailbox not ready, try later")


def test_rcpt_map_two_instances_keep_two_maps(make_server, tmp_path):
    write_map(tmp_path / "map_org", "me@example.org OK\n")
    write_map(tmp_path / "map_net", "you@example.net OK\n")
    server = make_server(section("rcpt_map", domain="example.org", file="map_org")
                         + section("rcpt_map:2", domain="example.net", file="map_net") + ACCEPT)
    assert rcpt(server, "me@example.org")[0] == 250
    assert rcpt(server, "you@example.net")[0] == 250
    assert rcpt(server, "you@example.org")[0] == 550
    assert rcpt(server, "me@example.net")[0] == 550


def test_rcpt_map_is_reread_when_it_changes(make_server, tmp_path):
    server = rcpt_map_server(make_server, tmp_path)
    assert rcpt(server, "new@example.org")[0] == 550
    write_map(tmp_path / "map_example_org", "new@example.org OK\n")
    touch_later(tmp_path / "map_example_org")
    assert rcpt(server, "new@example.org")[0] == 250
    assert rcpt(server, "me@example.org")[0] == 550


def test_rcpt_map_reject_0_only_logs(make_server, tmp_path):
    write_map(tmp_path / "map_example_org", MAP)
    server = make_server(section("rcpt_map", domain="example.org", file="map_example_org", reject="0")
                         + ACCEPT.replace("domains = example.test", "domains = example.test, example.org"))
    assert rcpt(server, "info@example.org")[0] == 250  # the refusal is logged; rcpt_ok accepts
    assert rcpt(server, "nobody@example.org")[0] == 250


@pytest.mark.parametrize("text, options, message", [
    ("", {}, "empty"),
    ("me@example.org MAYBE\n", {}, "MAYBE"),
    ("me@example.org OK\n", {"default": "PERHAPS=x"}, "PERHAPS"),
])
def test_rcpt_map_bad_map_is_a_load_error(make_server, tmp_path, text, options, message):
    write_map(tmp_path / "map", text)
    with pytest.raises(PluginLoadError, match=message):
        make_server(section("rcpt_map", domain="example.org", file="map", **options) + ACCEPT)


def test_rcpt_map_needs_domain_and_file(make_server):
    with pytest.raises(PluginLoadError, match="domain: missing"):
        make_server(section("rcpt_map", file="map") + ACCEPT)


# -- rcpt_regexp -----------------------------------------------------------------------------

RULES = r"""# first match wins
/^(abuse|postmaster)@/      DECLINED
/^(me|you)@example\.org$/   OK
boss@example.org            DENYSOFT Out of office until Monday
/@example\.org$/            DENY No such user here.
"""


@pytest.mark.parametrize("recipient, reply", [
    ("abuse@example.test", (250, b"2.1.5 <abuse@example.test>, recipient ok")),  # DECLINED: rcpt_ok decides
    ("abuse@example.org", (550, b"5.7.1 Relaying denied")),
    ("me@example.org", (250, b"2.1.5 <me@example.org>, recipient ok")),
    ("YOU@example.org", (250, b"2.1.5 <YOU@example.org>, recipient ok")),
    ("boss@example.org", (450, b"4.7.1 Out of office until Monday")),
    ("other@example.org", (550, b"5.7.1 No such user here.")),
    ("bob@example.test", (250, b"2.1.5 <bob@example.test>, recipient ok")),  # no match
])
def test_rcpt_regexp_rules(make_server, tmp_path, recipient, reply):
    (tmp_path / "rcpt_regexp").write_text(RULES)
    server = make_server(section("rcpt_regexp", file="rcpt_regexp") + ACCEPT)
    assert rcpt(server, recipient) == reply


def test_rcpt_regexp_inline_rules_come_first_and_the_file_is_reread(make_server, tmp_path):
    (tmp_path / "rcpt_regexp").write_text("/@example\\.test$/ DENY nope\n")
    server = make_server(section("rcpt_regexp", list='"/^bob@/ OK"', file="rcpt_regexp") + ACCEPT)
    assert rcpt(server, "bob@example.test")[0] == 250
    assert rcpt(server, "carol@example.test") == (550, b"5.7.1 nope")
    (tmp_path / "rcpt_regexp").write_text("/@example\\.test$/ DECLINED\n")
    touch_later(tmp_path / "rcpt_regexp")
    assert rcpt(server, "carol@example.test")[0] == 250


@pytest.mark.parametrize("rule, message", [('"/a(/ DENY"', "bad regex"), ('"/a/ SOMETIMES"', "CODE"),
                                           ('"/a"', "closing slash")])
def test_rcpt_regexp_bad_rule_is_a_load_error(make_server, rule, message):
    with pytest.raises(PluginLoadError, match=message):
        make_server(section("rcpt_regexp", list=rule) + ACCEPT)


# -- whitelist ----------------------------------------------------------------------------------

def whitelist_server(make_server, **options):
    return make_server(section("whitelist", **options) + section("show_notes") + ACCEPT, plugin_dirs=PLUGIN_DIR)


def test_whitelist_hosts_are_networks_not_text_prefixes(make_server, tmp_path):
    (tmp_path / "whitelisthosts").write_text("127.0.0.3\n")
    server = whitelist_server(make_server, hosts="127.0.0.1, 10.0.0.0/8", hosts_file="whitelisthosts")
    for source, expected in [("127.0.0.1", "True"), ("127.0.0.3", "True"), ("127.0.0.2", "None"),
                             ("127.0.0.10", "None"), ("127.0.0.31", "None")]:
        with smtp_from(server, source) as client:
            assert show(client, "whitelisthost") == f"whitelisthost={expected}", source


def test_whitelist_helos_senders_and_recipients(make_server):
    server = whitelist_server(make_server, helos="trusted.example", senders='"@partner.example", "boss@x.example"',
                              recipients='"postmaster@example.test", "@vip.example.test"')
    with smtp_from(server) as client:
        client.ehlo("TRUSTED.example")
        assert show(client, "whitelisthelo") == "whitelisthelo=True"
        assert client.mail("anyone@partner.example")[0] == 250
        assert show(client, "txn:whitelistsender") == "txn:whitelistsender=True"
        for recipient in ("postmaster@example.test", "bob@example.test", "x@vip.example.test"):
            client.rcpt(recipient)
        assert show(client, "txn:whitelistrcpt") == "txn:whitelistrcpt=['postmaster@example.test', " \
                                                   "'x@vip.example.test']"
        assert client.rset()[0] == 250
        assert client.mail("other@x.example")[0] == 250
        assert show(client, "txn:whitelistsender") == "txn:whitelistsender=None"  # per transaction
    with smtp_from(server) as client:
        client.ehlo("other.example")
        assert show(client, "whitelisthelo") == "whitelisthelo=None"


def test_whitelisted_recipients_are_not_accepted_by_the_whitelist(make_server):
    # qpsmtpd answered OK for them: a whitelisted foreign address became an open relay.
    server = whitelist_server(make_server, recipients='"x@elsewhere.test"')
    assert rcpt(server, "x@elsewhere.test") == (550, b"5.7.1 Relaying denied")


def test_whitelist_bad_network_is_a_load_error(make_server):
    with pytest.raises(PluginLoadError, match="not an address"):
        whitelist_server(make_server, hosts="127.0.0.300")


# -- bogus_bounce ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sender, recipients, message, reply", [
    ("", ("bob@example.test", "carol@example.test"), MESSAGE, (554, b"5.7.1 Invalid bounce: more than one recipient")),
    ("", ("bob@example.test",), b"Return-Path: <x@y.example>\r\n" + MESSAGE,
     (554, b"5.7.1 Invalid bounce: non-empty Return-Path")),
    ("", ("bob@example.test",), b"Return-Path: <>\r\n" + MESSAGE, (250, None)),
    ("", ("bob@example.test",), MESSAGE, (250, None)),
    ("a@client.test", ("bob@example.test", "carol@example.test"), b"Return-Path: <x@y>\r\n" + MESSAGE, (250, None)),
])
def test_bogus_bounce_rules(make_server, sender, recipients, message, reply):
    server = make_server(section("bogus_bounce") + ACCEPT)
    code, text = send(server, sender, recipients, message)
    assert code == reply[0] and (reply[1] is None or text == reply[1]), (code, text)


@pytest.mark.parametrize("options, code", [
    ({"action": "log"}, 250), ({"action": "deny"}, 554), ({"action": "denysoft"}, 451),
    ({"reject_type": "temp"}, 451), ({"reject": "0"}, 250),
])
def test_bogus_bounce_actions(make_server, options, code):
    server = make_server(section("bogus_bounce", **options) + ACCEPT)
    assert send(server, "", ("bob@example.test", "carol@example.test"))[0] == code


def test_bogus_bounce_relay_clients_are_not_checked(make_server):
    server = make_server(section("relay", clients="127.0.0.1") + section("bogus_bounce") + ACCEPT)
    assert send(server, "", ("bob@example.test", "carol@example.test"))[0] == 250
    assert len(maildir_messages(server.maildir)) == 1


# -- loadcheck ------------------------------------------------------------------------------------

def loadavg(tmp_path: Path, load: float) -> Path:
    path = tmp_path / "loadavg"
    path.write_text(f"{load:.2f} 0.50 0.25 1/100 4242\n")
    touch_later(path) if path.exists() else None
    return path


def test_loadcheck_refuses_with_421_above_max_load(make_server, tmp_path):
    loadavg(tmp_path, 9.5)
    server = make_server(section("loadcheck", max_load=7, cache_time=0, loadavg_file="loadavg") + ACCEPT)
    client = RawClient(server)
    assert client.reply() == (421, "4.7.0 Server load too high, please try again later")
    assert client.is_closed_by_server()
    client.close()
    loadavg(tmp_path, 7.0)  # at max_load is not above it
    assert greeting(server)[0] == 220


def test_loadcheck_reuses_a_reading_for_cache_time(make_server, tmp_path):
    loadavg(tmp_path, 1.0)
    server = make_server(section("loadcheck", max_load=7, cache_time=3600, loadavg_file="loadavg") + ACCEPT)
    assert greeting(server)[0] == 220
    loadavg(tmp_path, 50)
    assert greeting(server)[0] == 220  # the reading from start-up is still the one used


def test_loadcheck_reads_the_kernel_load_by_default(make_server):
    server = make_server(section("loadcheck", max_load=os.getloadavg()[0] + 1000) + ACCEPT)
    assert greeting(server)[0] == 220


def test_loadcheck_lets_relay_clients_in_and_reject_0_only_logs(make_server, tmp_path):
    loadavg(tmp_path, 99)
    server = make_server(section("relay", clients="127.0.0.2")
                         + section("loadcheck", max_load=1, loadavg_file="loadavg") + ACCEPT)
    assert greeting(server, "127.0.0.2")[0] == 220
    assert greeting(server, "127.0.0.1")[0] == 421
    server = make_server(section("loadcheck", max_load=1, loadavg_file="loadavg", reject="0") + ACCEPT)
    assert greeting(server)[0] == 220


def test_loadcheck_unreadable_loadavg_file_is_a_load_error(make_server):
    with pytest.raises(PluginLoadError, match="no-such-file"):
        make_server(section("loadcheck", loadavg_file="no-such-file") + ACCEPT)


def test_badmailfrom_reject_naughty_defers_the_refusal_to_a_later_plugin(make_server):
    server = make_server(section("badmailfrom", list="@bad.example", reject="naughty") + section("show_notes")
                         + ACCEPT, plugin_dirs=PLUGIN_DIR)
    with smtp_from(server) as client:
        client.ehlo()
        assert client.mail("x@bad.example")[0] == 250
        assert show(client, "result:badmailfrom:naughty") == (
            "result:badmailfrom:naughty='Your envelope sender is in my badmailfrom list'")
        assert show(client, "result:badmailfrom:naughty_reject_type") == "result:badmailfrom:naughty_reject_type='perm'"
