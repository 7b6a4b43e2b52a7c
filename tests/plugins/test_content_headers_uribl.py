"""headers and uribl through the real server and smtplib; uribl against a real NSD on loopback."""

from __future__ import annotations

import email.utils
import time

import pytest

from qpgevent.testing import maildir_messages
from qpgevent.testing.dns import LoopbackDns

QUEUE = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


def send(server, data):
    with server.smtp(timeout=30) as client:
        client.ehlo()
        client.mail("alice@sender.test")
        client.rcpt("bob@example.test")
        code, text = client.data(data)
    return code, text.decode()


def message(headers=None, body="hello"):
    fields = {"From": "alice@sender.test", "To": "bob@example.test", "Subject": "hi",
              "Date": email.utils.formatdate(time.time())}
    fields.update(headers or {})
    lines = [f"{name}: {value}" for name, value in fields.items() if value is not None]
    return ("\r\n".join(lines) + f"\r\n\r\n{body}\r\n").encode()


def days(n):
    return email.utils.formatdate(time.time() + n * 86400)


# -- headers ------------------------------------------------------------------------------

@pytest.fixture
def checks(make_server):
    def start(options=""):
        return make_server(plugins=f"[[headers]]\n{options}\n{QUEUE}")
    return start


def test_a_good_header_passes(checks):
    server = checks()
    assert send(server, message())[0] == 250
    assert len(maildir_messages(server.maildir)) == 1


@pytest.mark.parametrize("headers, text", [
    ({"From": None}, "missing required header: From"),
    ({"Date": None}, "missing required header: Date"),
    ({"Date": "yesterday-ish"}, "the Date header is not a valid date"),
    ({"Date": days(3)}, "the Date header is too far in the future"),
])
def test_header_problems_are_refused(checks, headers, text):
    server = checks()
    assert send(server, message(headers)) == (554, f"5.7.1 {text}")


def test_duplicate_singleton_is_refused(checks):
    server = checks()
    data = message().replace(b"Subject: hi\r\n", b"Subject: hi\r\nSubject: again\r\n")
    code, text = send(server, data)
    assert (code, text) == (554, "5.7.1 only one Subject header allowed (RFC 5322 3.6)")


def test_past_dates_only_when_configured(checks):
    assert send(checks(), message({"Date": days(-30)}))[0] == 250
    code, text = send(checks("past = 15"), message({"Date": days(-30)}))
    assert code == 554 and text.endswith("the Date header is too far in the past")


def test_header_size_limits(checks):
    server = checks("max_field_size = 200\nmax_fields = 20\nmax_header_size = 1000")
    code, text = send(server, message({"X-Long": "a" * 150 + "\r\n " + "b" * 150}))
    assert code == 554 and text.endswith("header too large: a X-Long field over 200 octets")
    many = {f"X-N{i}": "v" for i in range(30)}
    assert send(server, message(many))[1].endswith("header too large: 34 fields, at most 20")
    big = {f"X-B{i}": "c" * 90 for i in range(12)}
    assert "header too large: " in send(server, message(big))[1]


def test_reject_zero_only_logs(checks):
    assert send(checks("reject = 0"), message({"From": None}))[0] == 250


# -- uribl --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nsd():
    zones = {
        "uribl.test": {"evil.test": [("A", "127.0.0.2")], "phish.co.uk": [("A", "127.0.0.2")],
                       "broken-list.test": [("A", "127.255.255.254")]},
        "multi.test": {"black.test": [("A", "127.0.0.2")], "grey.test": [("A", "127.0.0.4")]},
    }
    with LoopbackDns(zones, servfail_zones=("down.test",)) as server:
        yield server


@pytest.fixture
def uribl(make_server, nsd):
    def start(options):
        return make_server(plugins=f"[[uribl]]\n{options}\n{QUEUE}", dns_nameservers="127.0.0.1",
                           dns_port=nsd.port, dns_timeout=2)

    return start


def headers_of(server):
    [mail] = maildir_messages(server.maildir).values()
    return mail.split(b"\r\n\r\n", 1)[0].decode()


def test_listed_link_is_tagged_by_default(uribl):
    server = uribl("zones = uribl.test")
    body = "click https://www.Evil.test/win?x=1 or http://fine.test/ and see www.phish.co.uk"
    assert send(server, message(body=body))[0] == 250
    head = headers_of(server)
    assert "X-URIBL-Match: evil.test in uribl.test" in head
    assert "X-URIBL-Match: phish.co.uk in uribl.test" in head


def test_listed_link_is_refused_with_action_deny(uribl):
    server = uribl("zones = down.test, uribl.test\naction = deny")
    code, text = send(server, message(body="see http://evil.test/"))
    assert (code, text) == (554, "5.7.1 link to evil.test is listed in uribl.test")


def test_link_split_by_quoted_printable_soft_break_is_found(uribl):
    server = uribl("zones = uribl.test\naction = deny")
    body = "see http://ev=\r\nil=2Etest/ now"
    assert send(server, message({"Content-Transfer-Encoding": "quoted-printable"}, body))[0] == 554


def test_bitmask_error_codes_and_whitelist(uribl):
    server = uribl("zones = multi.test:2, uribl.test\naction = deny\nwhitelist_domains = evil.test")
    assert send(server, message(body="http://grey.test/ http://evil.test/ http://broken-list.test/"))[0] == 250
    assert send(server, message(body="http://black.test/"))[0] == 554


def test_link_deep_in_a_large_body_and_the_scan_limit(uribl):
    filler = ("z" * 70 + "\r\n") * 30000  # 2.1 MiB: spooled to disk, read in chunks
    server = uribl("zones = uribl.test\naction = deny\nmax_scan_size = 4000000")
    assert send(server, message(body=filler + "http://evil.test/"))[0] == 554
    limited = uribl("zones = uribl.test\naction = deny")  # default 1 MiB: not reached
    assert send(limited, message(body=filler + "http://evil.test/"))[0] == 250
