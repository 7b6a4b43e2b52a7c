"""spamassassin and virus/clamdscan through the real server and smtplib, against a real
spamd and a real clamd started by the tests (clamd with a signature database the test
writes: no downloads), a scanner that accepts and never answers, and a closed port."""

from __future__ import annotations

import base64
import re
import smtplib
import time

import gevent
import pytest

from qpgevent.testing import maildir_messages
from qpgevent.testing.scanners import (EICAR, EICAR_NAME, GTUBE, HungScanner, LoopbackClamd,
                                       LoopbackSpamd, dead_port)

RCPT_AND_QUEUE = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


@pytest.fixture(scope="module")
def spamd():
    with LoopbackSpamd() as server:
        yield server


@pytest.fixture(scope="module")
def clamd():
    with LoopbackClamd() as server:
        yield server


@pytest.fixture
def hung():
    with HungScanner() as server:
        yield server


def message(body: str, subject: str = "lunch", extra: str = "") -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@sender.test>\r\nDate: Tue, 25 Nov 2026 10:00:00 +0000\r\n"
            f"{extra}\r\n{body}\r\n").encode()


def send(server, data: bytes) -> tuple[int, str]:
    with server.smtp(timeout=60) as client:
        client.ehlo()
        client.mail("alice@sender.test")
        client.rcpt("bob@example.test")
        code, text = client.data(data)
    return code, text.decode()


def delivered(server) -> list[bytes]:
    return list(maildir_messages(server.maildir).values())


def header_block(data: bytes) -> str:
    return data.split(b"\r\n\r\n", 1)[0].decode()


# -- spamassassin ------------------------------------------------------------------------

def start_spamassassin(make_server, socket, options=""):
    return make_server(plugins=f"[[spamassassin]]\n  spamd_socket = {socket}\n{options}\n{RCPT_AND_QUEUE}")


def test_gtube_is_refused_over_reject_score(make_server, spamd):
    server = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}", "  reject_score = 10")
    code, text = send(server, message(GTUBE))
    assert code == 554 and re.fullmatch(r"5\.7\.1 spam score 10\d\d\.\d+ exceeds 10\.0", text), text
    assert delivered(server) == []


def test_the_spam_refusal_follows_reject_and_reject_type(make_server, spamd):
    tolerated = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}", "  reject_score = 10\n  reject = 0")
    assert send(tolerated, message(GTUBE))[0] == 250
    deferred = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}", "  reject_score = 10\n  reject_type = temp")
    code, text = send(deferred, message(GTUBE))
    assert code == 451 and "spam score" in text, (code, text)


def test_ham_passes_with_a_no_verdict_and_forged_headers_are_dropped(make_server, spamd):
    server = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}", "  reject_score = 10")
    assert send(server, message("are we still on for lunch at noon?",
                                extra="X-Spam-Status: No, forged by the sender\r\nX-Spam-Flag: NO\r\n"))[0] == 250
    [mail] = delivered(server)
    head = header_block(mail)
    assert "forged by the sender" not in head and "X-Spam-Flag" not in head
    status = [line for line in head.split("\r\n") if line.startswith("X-Spam-Status: ")]
    assert len(status) == 1 and status[0].startswith("X-Spam-Status: No, score="), head
    assert "required=5.0" in status[0]


def test_spam_below_reject_score_is_tagged_and_subject_munged(make_server, spamd):
    server = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}",
                                "  munge_subject_threshold = 5\n  leave_old_headers = rename")
    assert send(server, message(GTUBE, subject="cheap", extra="X-Spam-Flag: NO\r\n"))[0] == 250
    [mail] = delivered(server)
    head = header_block(mail)
    assert "X-Spam-Flag: YES" in head and "X-Old-Spam-Flag: NO" in head
    assert "Subject: *** SPAM *** cheap" in head
    assert "tests=" in head and "GTUBE" in head
    assert "X-Spam-Level: " + "*" * 50 + "\r\n" in head + "\r\n"


def test_big_message_is_not_scanned(make_server, spamd):
    server = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}", "  reject_score = 5\n  size_limit = 1000")
    assert send(server, message(GTUBE + "\r\n" + ("x" * 70 + "\r\n") * 30))[0] == 250
    [mail] = delivered(server)
    assert "X-Spam-Status" not in header_block(mail)


@pytest.mark.parametrize("scanner_state", ["down", "hung"])
def test_spamd_unavailable_defers_by_default_within_the_scan_timeout(make_server, hung, scanner_state):
    port = dead_port() if scanner_state == "down" else hung.port
    server = start_spamassassin(make_server, f"127.0.0.1:{port}", "  scan_timeout = 1\n  timeout = 5")
    started = time.monotonic()
    code, text = send(server, message("hello"))
    assert (code, text) == (451, "4.7.1 spamd unavailable, try again later")
    assert time.monotonic() - started < 4
    assert delivered(server) == []


def test_spamd_unavailable_with_on_error_accept_adds_a_header(make_server):
    server = start_spamassassin(make_server, f"127.0.0.1:{dead_port()}", "  on_error = accept")
    assert send(server, message("hello"))[0] == 250
    [mail] = delivered(server)
    assert "X-Spam-Checker-Error: not scanned (spamd unavailable: cannot connect to" in header_block(mail)


# -- virus/clamdscan -----------------------------------------------------------------------

def start_clamdscan(make_server, socket, options=""):
    return make_server(plugins=f"[[virus/clamdscan]]\n  clamd_socket = {socket}\n{options}\n{RCPT_AND_QUEUE}")


def eicar_attachment() -> bytes:
    return (b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
            b"see attached\r\n--B\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"--B--\r\n")


def test_infected_attachment_is_refused_with_the_virus_name(make_server, clamd):
    server = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}")
    assert send(server, eicar_attachment()) == (554, f"5.7.1 Virus found: {EICAR_NAME}")
    assert delivered(server) == []


def test_the_virus_refusal_follows_reject_and_reject_type(make_server, clamd):
    tolerated = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}", "  reject = 0")
    assert send(tolerated, eicar_attachment())[0] == 250
    deferred = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}", "  reject_type = temp")
    code, text = send(deferred, eicar_attachment())
    assert code == 451 and text.endswith(f"Virus found: {EICAR_NAME}"), (code, text)


def test_clean_mail_is_marked_checked(make_server, clamd):
    server = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}")
    assert send(server, message("nothing to see"))[0] == 250
    [mail] = delivered(server)
    assert "X-Virus-Checked: Checked by ClamAV on mx.example.test" in header_block(mail)


def test_deny_viruses_no_only_adds_a_header(make_server, clamd):
    server = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}", "  deny_viruses = no")
    assert send(server, message(EICAR.decode()))[0] == 250
    [mail] = delivered(server)
    assert f"X-Virus-Found: {EICAR_NAME}" in header_block(mail)


def test_virus_deep_in_a_spooled_body_is_found(make_server, clamd):
    """A 3 MiB body goes to the spool file and is streamed in 64 KiB chunks; the signature
    sits across a chunk boundary."""
    server = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}", "  max_size = 10000000")
    filler = "y" * 76 + "\r\n"
    body = filler * 40000 + "z" * 30 + EICAR.decode() + "\r\n"
    assert send(server, message(body))[0] == 554
    assert delivered(server) == []


def test_message_over_max_size_is_not_scanned(make_server, clamd):
    server = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}", "  max_size = 100")
    assert send(server, message(EICAR.decode()))[0] == 250
    [mail] = delivered(server)
    assert "X-Virus-Checked" not in header_block(mail)


def test_clamd_hung_defers_within_the_timeout_and_other_sessions_go_on(make_server, hung, clamd):
    """While one session waits on a scanner that never answers, another session on the same
    server (whose clamd answers) is served at once; then the first gets its 451."""
    stuck = start_clamdscan(make_server, f"127.0.0.1:{hung.port}", "  scan_timeout = 2\n  timeout = 5")
    fine = start_clamdscan(make_server, f"127.0.0.1:{clamd.port}")
    started = time.monotonic()
    waiting = gevent.spawn(send, stuck, message("hello"))
    gevent.wait([waiting], timeout=0.3)  # not a synchronisation: just let it reach the scanner
    assert not waiting.ready()
    assert send(fine, message("meanwhile"))[0] == 250
    assert time.monotonic() - started < 2
    code, text = waiting.get(timeout=10)
    assert (code, text) == (451, "4.7.1 clamd unavailable, try again later")
    assert 1.9 < time.monotonic() - started < 5


def test_clamd_down_with_on_error_accept(make_server):
    server = start_clamdscan(make_server, f"127.0.0.1:{dead_port()}", "  on_error = accept")
    assert send(server, message("hello"))[0] == 250
    [mail] = delivered(server)
    assert "X-Virus-Checker-Error: not scanned (clamd unavailable: cannot connect to" in header_block(mail)


@pytest.mark.parametrize("plugin, option", [("spamassassin", "spamd_socket"), ("virus/clamdscan", "clamd_socket")])
def test_a_scanner_address_that_is_no_address_stops_the_server_at_start(make_server, plugin, option):
    from qpgevent.core.errors import PluginLoadError
    with pytest.raises(PluginLoadError, match="is not host:port"):
        make_server(plugins=f"[[{plugin}]]\n  {option} = localhost\n{RCPT_AND_QUEUE}")


def test_a_spooled_message_is_streamed_to_spamd_with_its_length(make_server, spamd):
    """A 2 MiB body lives in the spool file; spamd gets it all: a Content-length that did not
    match what is sent would leave spamd waiting (451 after scan_timeout) or make it refuse.
    (SpamAssassin 4 reads only the first 50 kB of a part for body rules: GTUBE goes first.)"""
    server = start_spamassassin(make_server, f"127.0.0.1:{spamd.port}",
                                "  size_limit = 5000000\n  reject_score = 10\n  scan_timeout = 20\n  timeout = 30")
    body = GTUBE + "\r\n" + ("the quarterly report is attached below, as discussed on the phone\r\n" * 31000)
    code, text = send(server, message(body))
    assert code == 554 and "spam score" in text, (code, text)
