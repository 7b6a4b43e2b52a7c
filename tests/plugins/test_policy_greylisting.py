"""greylisting, every rule, on both store backends (embedded SQLite, and a real Redis).

Periods are a second or two; tests wait on conditions with deadlines (a retry loop
that stops at the first 250), never a fixed sleep, and check when the pass came.
The end-to-end tests use smtplib against real ``qpgevent`` processes sharing one
store: the retry lands on another process (another worker of the host with the
embedded store; another host's instance with Redis) and passes there.
"""

from __future__ import annotations

import smtplib
import time

import gevent
import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import ServerProcess, maildir_messages, wait_until, write_ini

from policy_helpers import ACCEPT, mail_rcpt, rcpt, section, send, smtp_from

GREYLISTED = (450, b"4.7.1 This mail is temporarily denied")
BLACK = 1.0


def greylisting(**options) -> str:
    options = {"black_timeout": BLACK, "grey_timeout": "30s", **options}
    return section("greylisting", **options) + ACCEPT


def passes_after_black(attempt, first_seen: float, expected=250):
    """Retry (each retry a real attempt) until one passes; check it was not before BLACK."""
    code = wait_until(lambda: attempt()[0] == expected and time.monotonic(), BLACK + 10, "the retry passing", 0.2)
    assert code - first_seen >= BLACK - 0.05, "passed before the black period was over"


def test_first_attempt_and_early_retries_are_refused_then_the_triplet_passes(policy_server):
    server = policy_server(greylisting())
    first = time.monotonic()
    assert rcpt(server, "bob@example.test") == GREYLISTED
    assert rcpt(server, "bob@example.test") == GREYLISTED  # too soon
    passes_after_black(lambda: rcpt(server, "bob@example.test"), first)
    # White now: no wait for later messages of the same triplet.
    assert send(server)[0] == 250
    assert send(server)[0] == 250
    assert len(maildir_messages(server.maildir)) == 2


def test_each_part_of_the_triplet_counts(policy_server):
    server = policy_server(greylisting())
    first = time.monotonic()
    assert rcpt(server, "bob@example.test") == GREYLISTED
    passes_after_black(lambda: rcpt(server, "bob@example.test"), first)
    assert rcpt(server, "carol@example.test") == GREYLISTED  # another recipient
    assert rcpt(server, "bob@example.test", sender="other@client.test") == GREYLISTED  # another sender
    assert rcpt(server, "bob@example.test", source="127.0.0.2") == GREYLISTED  # another address
    assert rcpt(server, "bob@example.test")[0] == 250


def test_recipients_of_one_message_are_greylisted_one_by_one(policy_server):
    server = policy_server(greylisting())
    first = time.monotonic()
    assert rcpt(server, "bob@example.test") == GREYLISTED
    passes_after_black(lambda: rcpt(server, "bob@example.test"), first)
    replies = mail_rcpt(server, "a@client.test", ["bob@example.test", "carol@example.test"])
    assert replies == [(250, b"2.1.5 <bob@example.test>, recipient ok"), GREYLISTED]


def test_subnet_mode_greylists_the_slash_24(policy_server):
    server = policy_server(greylisting(subnet="yes"))
    first = time.monotonic()
    assert rcpt(server, "bob@example.test", source="127.0.0.1") == GREYLISTED
    passes_after_black(lambda: rcpt(server, "bob@example.test", source="127.0.0.2"), first)
    assert rcpt(server, "bob@example.test", source="127.0.0.200")[0] == 250
    assert rcpt(server, "bob@example.test", source="127.0.1.1") == GREYLISTED


def test_parts_can_be_left_out(policy_server):
    server = policy_server(greylisting(sender="no", recipient="no"))
    first = time.monotonic()
    assert rcpt(server, "bob@example.test") == GREYLISTED
    passes_after_black(lambda: rcpt(server, "carol@example.test", sender="x@y.test"), first)
    assert rcpt(server, "dave@example.test", sender="z@y.test")[0] == 250  # the address alone decides
    assert rcpt(server, "dave@example.test", source="127.0.0.2") == GREYLISTED


def test_a_triplet_not_retried_within_grey_timeout_starts_over(policy_server):
    server = policy_server(greylisting(black_timeout="0.3", grey_timeout="1"))
    assert rcpt(server, "bob@example.test") == GREYLISTED
    first = time.monotonic()
    wait_until(lambda: time.monotonic() - first > 1.2, 5, "the grey period passing")
    assert rcpt(server, "bob@example.test") == GREYLISTED  # forgotten: a first attempt again
    second = time.monotonic()
    wait_until(lambda: rcpt(server, "bob@example.test")[0] == 250, 5, "the new retry passing", 0.1)
    assert time.monotonic() - second >= 0.25


def test_a_white_triplet_lapses_after_white_timeout_without_mail(policy_server):
    server = policy_server(greylisting(black_timeout="0", grey_timeout="10", white_timeout="1"))
    assert rcpt(server, "bob@example.test") == GREYLISTED
    assert rcpt(server, "bob@example.test")[0] == 250  # black 0: any retry passes
    whitened = time.monotonic()
    # Any message would renew it: wait on the clock alone, then try once.
    wait_until(lambda: time.monotonic() - whitened > 1.3, 5, "white_timeout passing")
    assert rcpt(server, "bob@example.test") == GREYLISTED


def test_each_message_renews_a_white_triplet(policy_server):
    server = policy_server(greylisting(black_timeout="0", grey_timeout="10", white_timeout="1.5"))
    assert rcpt(server, "bob@example.test") == GREYLISTED
    start = time.monotonic()
    while time.monotonic() - start < 3.5:  # more than twice white_timeout, renewed all along
        assert rcpt(server, "bob@example.test")[0] == 250
        gevent.sleep(0.2)  # pacing, not synchronisation: a message every 0.2 s


def test_deny_late_refuses_at_data_with_451(policy_server):
    server = policy_server(greylisting(deny_late="yes"))
    first = time.monotonic()
    assert send(server, recipients=("bob@example.test", "carol@example.test")) == \
        (451, b"4.7.1 This mail is temporarily denied")
    passes_after_black(lambda: send(server, recipients=("bob@example.test", "carol@example.test")), first)


def test_null_sender_is_refused_at_data_so_probes_get_an_answer(policy_server):
    server = policy_server(greylisting())
    assert rcpt(server, "bob@example.test", sender="")[0] == 250  # a callout probe stops here
    assert send(server, sender="") == (451, b"4.7.1 This mail is temporarily denied")


def test_relay_clients_and_whitelisted_hosts_senders_recipients_are_not_greylisted(policy_server):
    server = policy_server(section("relay", clients="127.0.0.2")
                           + section("whitelist", hosts="127.0.0.3", senders="@friend.test",
                                     recipients="postmaster@example.test")
                           + greylisting())
    assert rcpt(server, "bob@example.test", source="127.0.0.2")[0] == 250
    assert rcpt(server, "bob@example.test", source="127.0.0.3")[0] == 250
    assert rcpt(server, "bob@example.test", sender="x@friend.test")[0] == 250
    replies = mail_rcpt(server, "a@client.test", ["postmaster@example.test", "bob@example.test"])
    assert replies == [(250, b"2.1.5 <postmaster@example.test>, recipient ok"), GREYLISTED]


def test_reject_0_records_triplets_but_refuses_nothing(policy_server):
    server = policy_server(greylisting(reject="0"))
    assert rcpt(server, "bob@example.test")[0] == 250
    assert send(server, sender="")[0] == 250


@pytest.mark.parametrize("options, message", [
    ({"black_timeout": "5x"}, "not a duration"),
    ({"black_timeout": "10m", "grey_timeout": "5m"}, "must be longer than black_timeout"),
    ({"white_timeout": "0"}, "white_timeout"),
])
def test_bad_periods_are_load_errors(make_server, options, message):
    with pytest.raises(PluginLoadError, match=message):
        make_server(section("greylisting", **options) + ACCEPT)


# -- end to end, real processes ------------------------------------------------------------------

def start_instance(folder, backend) -> ServerProcess:
    folder.mkdir()
    ini = write_ini(folder, greylisting(deny_late="yes"), **backend)
    return ServerProcess(ini)


def sendmail(instance) -> dict | tuple[int, bytes]:
    try:
        with smtplib.SMTP("127.0.0.1", instance.port, local_hostname="mx.client.test", timeout=10) as client:
            return client.sendmail("a@client.test", ["bob@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    except smtplib.SMTPDataError as error:
        return error.smtp_code, error.smtp_error


def test_smtplib_end_to_end_and_the_retry_passes_on_another_server_process(tmp_path, backend):
    first, second = start_instance(tmp_path / "one", backend), start_instance(tmp_path / "two", backend)
    try:
        assert first.port != second.port
        started = time.monotonic()
        assert sendmail(first) == (451, b"4.7.1 This mail is temporarily denied")
        assert sendmail(second) == (451, b"4.7.1 This mail is temporarily denied")  # the same triplet: too soon
        passed = wait_until(lambda: sendmail(second) == {} and time.monotonic(), BLACK + 10, "the retry passing", 0.2)
        assert passed - started >= BLACK - 0.05
        assert sendmail(first) == {}  # white for every process sharing the store
        assert len(maildir_messages(tmp_path / "one" / "Maildir")) == 1
        assert len(maildir_messages(tmp_path / "two" / "Maildir")) == 1
    finally:
        for instance in (first, second):
            assert instance.terminate() == 0, instance.log()
