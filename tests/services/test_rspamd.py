"""rspamd over HTTP /checkv2 through the real server and smtplib, against a real rspamd
(own config: GTUBE rejects, Subject QPG-SPAM gets "add header", QPG-REWRITE "rewrite
subject", QPG-SOFT a forced "soft reject"), a scanner that never answers, one that answers
garbage, a closed port, and rspamd killed in the middle of a session."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import ssl
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer

from qpgevent.address import Address
from qpgevent.core.headers import Headers
from qpgevent.testing.mta import make_certificates
from qpgevent.testing.scanners import GTUBE, HungScanner, dead_port
from service_daemons import LoopbackRspamd
from service_helpers import RCPT_AND_QUEUE, delivered, header_block, message, send, smtp


def start(make_server, address, options="", **settings):
    return make_server(plugins=f"[[rspamd]]\n  url = http://{address}\n{options}\n{RCPT_AND_QUEUE}", **settings)


def test_gtube_is_refused_with_rspamds_text(make_server, rspamd):
    server = start(make_server, rspamd.address)
    assert send(server, message("t", GTUBE)) == (554, "5.7.1 Gtube pattern")
    assert delivered(server) == []


def test_add_header_marks_the_message_and_applies_the_milter_block(make_server, rspamd):
    server = start(make_server, rspamd.address)
    forged = "X-Spam-Status: No, forged\r\nX-Spam-Flag: NO\r\nX-Rspamd-Score: 0 / 15\r\n"
    assert send(server, message("QPG-SPAM", extra=forged))[0] == 250
    [mail] = delivered(server)
    head = header_block(mail)
    assert "X-Spam-Flag: YES" in head and "X-Spam-Flag: NO" not in head
    # milter block: remove_headers X-Spam-Status (all of them), add_headers "Yes, score=9.60"
    [status] = re.findall(r"X-Spam-Status: (.*)", head)
    score = float(re.fullmatch(r"Yes, score=(\d+\.\d\d)\r", status).group(1))
    assert 8 < score < 15, score  # QPG_TEST_ADDHEADER scores 8, plus rspamd's own rules
    assert re.search(rf"X-Rspamd-Score: {score:g} / 15.0\r", head), head
    assert "X-Rspamd-Bar: " + "+" * int(score) + "\r" in head
    assert "QPG_TEST_ADDHEADER" in head.split("X-Rspamd-Report:", 1)[1].split("\r\n")[0]
    assert "X-Rspamd-Score: 0 / 15" not in head


def test_rewrite_subject_uses_rspamds_subject(make_server, rspamd):
    server = start(make_server, rspamd.address)
    assert send(server, message("QPG-REWRITE offer"))[0] == 250
    head = header_block(delivered(server)[0])
    assert "Subject: ***SPAM*** QPG-REWRITE offer" in head and head.count("Subject:") == 1
    assert "X-Spam-Flag: YES" in head


def test_soft_reject_defers_with_rspamds_text(make_server, rspamd):
    server = start(make_server, rspamd.address)
    assert send(server, message("QPG-SOFT")) == (451, "4.7.1 come back later (test)")
    assert delivered(server) == []


def test_soft_reject_can_be_ignored(make_server, rspamd):
    lenient = start(make_server, rspamd.address, "  soft_reject = no")
    assert send(lenient, message("QPG-SOFT"))[0] == 250
    assert "X-Spam-Flag" not in header_block(delivered(lenient)[0])


def test_ham_gets_only_the_milter_headers_unless_add_headers_always(make_server, rspamd):
    server = start(make_server, rspamd.address)
    assert send(server, message("lunch?"))[0] == 250
    head = header_block(delivered(server)[0])
    assert re.search(r"X-Spam-Status: No, score=\d\.\d\d\r", head), head
    assert "X-Spam-Flag" not in head and "X-Rspamd-Score" not in head


def test_add_headers_always_scores_ham_too(make_server, rspamd):
    always = start(make_server, rspamd.address, "  add_headers = always\n  milter_headers = no")
    assert send(always, message("lunch?"))[0] == 250
    head = header_block(delivered(always)[0])
    assert re.search(r"X-Rspamd-Score: \d\.\d+ / 15.0\r", head) and "X-Spam-Status" not in head


def test_settings_id_for_relay_clients_changes_the_verdict(make_server, rspamd):
    # qpg_relaxed raises every threshold: the QPG-SPAM message gets "no action" then.
    plugins = f"[[relay]]\n  clients = 127.0.0.1\n[[rspamd]]\n  url = http://{rspamd.address}\n" \
              f"  settings_id_relay = qpg_relaxed\n{RCPT_AND_QUEUE}"
    relaxed = make_server(plugins=plugins)
    assert send(relaxed, message("QPG-SPAM"))[0] == 250
    head = header_block(delivered(relaxed)[0])
    assert "X-Spam-Flag" not in head and "X-Spam-Status: No, score=" in head


def test_settings_id_relay_is_not_sent_for_other_clients(make_server, rspamd):
    strict = start(make_server, rspamd.address, "  settings_id_relay = qpg_relaxed")  # not a relay client
    assert send(strict, message("QPG-SPAM"))[0] == 250
    assert "X-Spam-Flag: YES" in header_block(delivered(strict)[0])


def test_a_large_message_is_streamed_and_scanned(make_server, rspamd):
    server = start(make_server, rspamd.address)
    body = ("x" * 76 + "\r\n") * 40000  # 3 MB: spooled to a file past the 1 MiB threshold
    assert send(server, message("QPG-SPAM", body))[0] == 250
    [mail] = delivered(server)
    assert "X-Spam-Flag: YES" in header_block(mail) and len(mail) > 3_000_000


# -- rspamd down, hung, answering garbage, killed mid-session ------------------------------

@pytest.fixture
def garbage_http():
    def answer(sock, _address):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!")
        sock.close()
    server = StreamServer(("127.0.0.1", 0), answer)
    server.start()
    yield f"127.0.0.1:{server.server_port}"
    server.stop(timeout=0)


@pytest.mark.parametrize("mode,expected", [("tempfail", (451, "4.3.0 rspamd unavailable, try again later")),
                                           ("reject", (554, "5.3.0 rspamd unavailable"))])
def test_a_closed_port_gives_the_configured_reply(make_server, mode, expected):
    server = start(make_server, f"127.0.0.1:{dead_port()}", f"  on_failure = {mode}")
    assert send(server, message("QPG-SPAM")) == expected
    assert delivered(server) == []


def test_garbage_is_a_failure(make_server, garbage_http):
    assert send(start(make_server, garbage_http), message()) == (451, "4.3.0 rspamd unavailable, try again later")


def test_garbage_with_on_failure_accept_lets_the_message_through(make_server, garbage_http):
    lenient = start(make_server, garbage_http, "  on_failure = accept")
    assert send(lenient, message("QPG-SPAM"))[0] == 250
    assert "X-Spam-Flag" not in header_block(delivered(lenient)[0])


def test_a_hung_rspamd_meets_call_timeout_and_other_sessions_go_on(make_server):
    with HungScanner() as hung:
        server = start(make_server, f"127.0.0.1:{hung.port}", "  call_timeout = 2")
        waiting = gevent.spawn(send, server, message())
        gevent.wait([waiting], timeout=1.0)
        # while one session waits for rspamd, the worker serves another one at once
        with smtp(server) as other:
            assert other.noop()[0] == 250
        assert waiting.get(timeout=30) == (451, "4.3.0 rspamd unavailable, try again later")
        assert hung.connections == 1
    assert delivered(server) == []


def test_rspamd_killed_mid_session_gives_the_fallback_and_loses_nothing(make_server):
    own = LoopbackRspamd()
    try:
        server = start(make_server, own.address)
        with smtp(server) as client:
            client.ehlo("mail.example.test")
            client.mail("a@example.test")
            client.rcpt("b@example.test")
            assert client.data(message("QPG-SPAM"))[0] == 250  # scanned while it ran
            own.stop()
            client.mail("a@example.test")
            client.rcpt("b@example.test")
            assert client.data(message("second")) == (451, b"4.3.0 rspamd unavailable, try again later")
    finally:
        own.close()
    assert len(delivered(server)) == 1


def test_settings_id_for_authenticated_users(plugin_harness, rspamd):
    harness = plugin_harness("rspamd", url=f"http://{rspamd.address}", settings_id_authenticated="qpg_relaxed")
    verdicts = {}
    for user in ("alice", None):
        session = harness.session(ip="192.0.2.25", helo="mail.example.test")
        if user:
            session.connection.notes["auth_user"] = user
        transaction = session.transaction
        transaction.sender = Address.parse("<a@example.test>")
        transaction.add_recipient(Address.parse("<b@example.test>"))
        transaction.write(message("QPG-SPAM"))
        transaction.end_of_data()
        assert harness.run_hook("data_post", session=session).verdict.code.name == "DECLINED"
        verdicts[user] = transaction.notes["rspamd"]
    assert verdicts["alice"]["action"] == "no action" and verdicts["alice"]["required_score"] == 500
    assert "QPG_SAW_USER" in verdicts["alice"]["symbols"] and "QPG_SAW_USER" not in verdicts[None]["symbols"]
    assert verdicts[None]["action"] == "add header" and "QPG_TEST_ADDHEADER" in verdicts[None]["symbols"]


def test_rspamd_stopped_mid_session_meets_call_timeout(make_server):
    # SIGSTOP: the real daemon hangs with its sockets open (a stuck scanner), after one scan
    own = LoopbackRspamd()
    try:
        server = start(make_server, own.address, "  call_timeout = 2")
        with smtp(server) as client:
            client.ehlo("mail.example.test")
            client.mail("a@example.test")
            client.rcpt("b@example.test")
            assert client.data(message("QPG-SPAM"))[0] == 250
            os.killpg(own.process.pid, signal.SIGSTOP)
            try:
                client.mail("a@example.test")
                client.rcpt("b@example.test")
                assert client.data(message("second")) == (451, b"4.3.0 rspamd unavailable, try again later")
                with smtp(server) as other:  # the worker goes on meanwhile
                    assert other.noop()[0] == 250
            finally:
                os.killpg(own.process.pid, signal.SIGCONT)
    finally:
        own.close()
    assert len(delivered(server)) == 1


@pytest.fixture
def huge_http():
    def answer(sock, _address):
        sock.recv(65536)
        size = 5 << 20
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"{" + b" " * (size - 1))
        sock.close()
    server = StreamServer(("127.0.0.1", 0), answer)
    server.start()
    yield f"127.0.0.1:{server.server_port}"
    server.stop(timeout=0)


def test_an_answer_over_4_mib_is_a_failure(make_server, huge_http):
    server = start(make_server, huge_http)
    assert send(server, message()) == (451, "4.3.0 rspamd unavailable, try again later")


def test_messages_over_size_limit_are_not_scanned(make_server, rspamd):
    server = start(make_server, rspamd.address, "  size_limit = 100")
    assert send(server, message("t", GTUBE))[0] == 250
    assert "X-Spam" not in header_block(delivered(server)[0])


def test_greylist_is_accepted_unless_defer_greylist(make_server, rspamd):
    server = start(make_server, rspamd.address)
    assert send(server, message("QPG-GREY"))[0] == 250


def test_defer_greylist_defers(make_server, rspamd):
    server = start(make_server, rspamd.address, "  defer_greylist = yes")
    assert send(server, message("QPG-GREY")) == (451, "4.7.1 Greylisted, try again later")
    assert delivered(server) == []


def test_an_encrypted_session_is_told_to_rspamd(make_server, rspamd, tmp_path):
    _, cert, key = make_certificates(tmp_path / "tls")
    server = make_server(plugins=f"[[rspamd]]\n  url = http://{rspamd.address}\n  add_headers = always\n{RCPT_AND_QUEUE}",
                         certificate=cert, key=key)
    for tls in (False, True):
        with smtp(server) as client:
            client.ehlo("mail.example.test")
            if tls:
                client.starttls(context=ssl._create_unverified_context())
                client.ehlo("mail.example.test")
            assert client.sendmail("a@example.test", ["b@example.test"], message(f"tls={tls}")) == {}
    reports = {re.search(r"Subject: (.*)\r\n", head).group(1): re.search(r"X-Rspamd-Report: (.*)\r\n", head).group(1)
               for head in map(header_block, delivered(server))}
    assert "QPG_SAW_TLS" in reports["tls=True"].split() and "QPG_SAW_TLS" not in reports["tls=False"].split()


def _plugin_module():
    spec = importlib.util.spec_from_file_location("rspamd_plugin", Path(__file__).parents[2] / "plugins" / "rspamd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("remove,kept", [(0, []), (1, ["b", "c"]), (2, ["a", "c"]), (-1, ["a", "b"]), (5, ["a", "b", "c"])])
def test_milter_remove_headers_counts_as_rspamd_does(remove, kept):
    # rspamd's milter block: 0 removes all, n the n-th, -n the n-th from the end
    headers = Headers.parse(b"X-Tag: a\r\nSubject: s\r\nX-Tag: b\r\nX-Tag: c\r\n")
    _plugin_module().apply_milter_block(headers, {"remove_headers": {"X-Tag": remove}})
    assert headers.get_all("X-Tag") == kept and headers.get("Subject") == "s"


def test_milter_add_headers_takes_strings_objects_and_lists():
    headers = Headers.parse(b"Subject: s\r\n")
    _plugin_module().apply_milter_block(headers, {"add_headers": {
        "X-One": "1", "X-Top": {"value": "t", "order": 0}, "X-Many": [{"value": "m1", "order": -1}, "m2"]}})
    assert list(headers) == [("X-Top", "t"), ("Subject", "s"), ("X-One", "1"), ("X-Many", "m1"), ("X-Many", "m2")]
