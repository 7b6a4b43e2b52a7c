"""karma, every rule, on both store backends (embedded SQLite, and a real Redis).

A session's score is read over SMTP (the show_notes test plugin answers HELP with a
note); the history it leaves is written at disconnect, after the client has gone, so
tests wait for it in the store itself (``server.services.store``, the in-process
server's own) before the next connection.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import RawClient, wait_until

from policy_helpers import ACCEPT, greeting, section, send, smtp_from

PLUGIN_DIR = str(Path(__file__).resolve().parents[1] / "data" / "plugins")
IP = "127.0.0.1"


def karma_server(policy_server, extra: str = "", after: str = "", **options):
    """karma, then badrcptto (its spam trap gives a DENY), then ``after`` and rcpt_ok."""
    options = {"tarpit_delay": 0, **options}
    return policy_server(extra + section("karma", **options) + section("show_notes")
                         + section("badrcptto", list="spamtrap@example.test") + after + ACCEPT,
                         plugin_dirs=PLUGIN_DIR)


def show(client, note: str) -> str:
    code, text = client.docmd("HELP", note)
    assert code == 214, (code, text)
    return text.decode().split("=", 1)[1]


def naughty_session(server, source: str = IP) -> None:
    """One session that hits the spam trap (a DENY: karma -1) and sends nothing."""
    with smtp_from(server, source) as client:
        client.ehlo()
        client.mail("a@client.test")
        assert client.rcpt("spamtrap@example.test")[0] == 550
        assert show(client, "karma") == "-1"


def recorded(server, key: str, value: str) -> None:
    wait_until(lambda: server.services.store.get(key) == value, 5, f"{key} = {value} in the store")


def boxed(server, ip: str = IP) -> None:
    """Wait until the penalty is stored: the plugin writes it just after the naughty count."""
    wait_until(lambda: server.services.store.get(f"karma:penalty:{ip}") is not None, 5, f"the penalty of {ip}")


def test_the_session_score_follows_other_plugins_verdicts(policy_server):
    server = karma_server(policy_server, after=section("greylisting", black_timeout="1h", grey_timeout="2h"))
    with smtp_from(server) as client:
        client.ehlo()
        assert show(client, "karma") == "0"
        assert show(client, "karma_history") == "0"
        client.mail("a@client.test")
        assert client.rcpt("spamtrap@example.test")[0] == 550  # DENY: -1
        assert show(client, "karma") == "-1"
        assert client.rcpt("bob@example.test")[0] == 450  # DENYSOFT (greylisting): 0
        assert show(client, "karma") == "-1"


def test_a_delivered_message_scores_and_counts_as_nice(policy_server):
    server = karma_server(policy_server)
    with smtp_from(server) as client:
        client.ehlo()
        assert client.sendmail("a@client.test", ["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
        assert show(client, "karma") == "1"  # queue/maildir said OK
    recorded(server, f"karma:nice:{IP}", "1")
    with smtp_from(server) as client:
        assert show(client, "karma_history") == "1"


def test_custom_scores(policy_server):
    server = karma_server(policy_server, scores='"badrcptto DENY -5", "rcpt_ok OK 2"')
    with smtp_from(server) as client:
        client.ehlo()
        client.mail("a@client.test")
        client.rcpt("bob@example.test")
        client.rcpt("carol@example.test")
        assert show(client, "karma") == "4"
        client.rcpt("spamtrap@example.test")
        assert show(client, "karma") == "-1"


def test_a_naughty_session_sends_the_address_to_the_penalty_box(policy_server):
    server = karma_server(policy_server)
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    boxed(server)
    client = RawClient(server)
    code, text = client.reply()
    assert code == 554 and re.fullmatch(r"5\.7\.1 You were naughty\. You are penalized for (0\.99|1\.00) more days\.",
                                        text), text
    assert client.is_closed_by_server()
    client.close()
    assert greeting(server, "127.0.0.2")[0] == 220  # only that address


def test_the_penalty_ends_after_penalty_days(policy_server):
    # 8 seconds: long enough that a loaded machine still sees the penalty in force,
    # short enough to wait for its end.
    server = karma_server(policy_server, penalty_days=8 / 86400)
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    boxed(server)
    since = time.monotonic()
    assert greeting(server)[0] == 554
    wait_until(lambda: greeting(server)[0] == 220, 10, "the penalty ending", 0.1)
    assert time.monotonic() - since >= 2.0


def test_negative_sets_how_bad_the_history_must_be(policy_server):
    server = karma_server(policy_server, negative=2)
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    assert greeting(server)[0] == 220  # -1 > -2: not yet
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "2")
    boxed(server)
    assert greeting(server)[0] == 554


def test_nice_history_outweighs_one_naughty_session(policy_server):
    server = karma_server(policy_server)
    assert send(server)[0] == 250
    recorded(server, f"karma:nice:{IP}", "1")
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    with smtp_from(server) as client:  # 1 nice - 1 naughty = 0: let in
        assert show(client, "karma_history") == "0"


def test_negative_history_limits_recipients(policy_server):
    server = karma_server(policy_server, penalty_days=0, naughty_recipients=2)
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    with smtp_from(server) as client:
        client.ehlo()
        client.mail("a@client.test")
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.rcpt("carol@example.test")[0] == 250
        assert client.rcpt("dave@example.test") == (450, b"4.5.3 too many recipients for karma -1")
    with smtp_from(server, "127.0.0.2") as client:  # a clean address: no limit
        client.ehlo()
        client.mail("a@client.test")
        for recipient in ("bob@example.test", "carol@example.test", "dave@example.test"):
            assert client.rcpt(recipient)[0] == 250


def test_bad_karma_is_tarpitted(policy_server):
    server = karma_server(policy_server, penalty_days=0, tarpit_delay=0.4, tarpit_max=0.6)
    started = time.monotonic()
    assert greeting(server)[0] == 220
    assert time.monotonic() - started < 0.3  # no history: no delay
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    started = time.monotonic()
    assert greeting(server)[0] == 220
    assert time.monotonic() - started >= 0.35  # history -1: 0.4 s before the greeting
    with smtp_from(server) as client:
        client.ehlo()
        client.mail("a@client.test")
        client.rcpt("spamtrap@example.test")  # now -2 in all: 0.8 s, capped at tarpit_max
        started = time.monotonic()
        assert client.rcpt("bob@example.test")[0] == 250
        assert 0.55 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    assert greeting(server, "127.0.0.2")[0] == 220
    assert time.monotonic() - started < 0.3  # others are not slowed


def test_relay_clients_are_neither_scored_nor_boxed(policy_server):
    # rcpt_regexp refuses the trap whoever asks (badrcptto would let a relay client through).
    server = karma_server(policy_server, extra=section("relay", clients="127.0.0.2"),
                          after=section("rcpt_regexp", list='"trap@example.test DENY trap"'))
    for source in ("127.0.0.2", "127.0.0.3"):
        with smtp_from(server, source) as client:
            client.ehlo()
            client.mail("a@client.test")
            assert client.rcpt("trap@example.test") == (550, b"5.7.1 trap")
    recorded(server, "karma:naughty:127.0.0.3", "1")  # the other client's session is recorded ...
    assert server.services.store.get("karma:naughty:127.0.0.2") is None  # ... the relay client's is not
    assert greeting(server, "127.0.0.2")[0] == 220
    boxed(server, "127.0.0.3")
    assert greeting(server, "127.0.0.3")[0] == 554


def test_reject_0_lets_the_penalty_box_in(policy_server):
    server = karma_server(policy_server, reject="0")
    naughty_session(server)
    recorded(server, f"karma:naughty:{IP}", "1")
    assert greeting(server)[0] == 220


@pytest.mark.parametrize("scores, message", [('"* DENY"', "PLUGIN CODE POINTS"), ('"* MAYBE -1"', "CODE one of"),
                                             ('"* DENY lots"', "whole number")])
def test_bad_scores_are_load_errors(make_server, scores, message):
    with pytest.raises(PluginLoadError, match=message):
        make_server(section("karma", scores=scores) + ACCEPT)
