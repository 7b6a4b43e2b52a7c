"""The milter plugin in the real server against a scripted test peer (milter_peer.py, real
sockets): what goes over the wire at each step, every kind of reply, every change applied to
the queued message, and peers that hang, close, flood progress or answer garbage."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from qpgevent.testing import RawClient, maildir_messages, wait_until
from qpgevent.testing.scanners import dead_port

from milter_helpers import RCPT_AND_QUEUE, delivered, message, milter_ini, send
from milter_peer import CLOSE, HANG, PeerMilter, header_change, packet

PER_RECIPIENT = """
[[rcpt_ok]]
  domains = example.test, example.org
[[queue/maildir]]
  path = Maildir
  mailbox = %d/%l
"""
NOHELO, NOHDRS, NR_RCPT, HDR_LEADSPC = 0x2, 0x20, 0x8000, 0x100000


@pytest.fixture
def peers():
    started = []

    def start(answers=None, **options):
        peer = PeerMilter(answers, **options)
        started.append(peer)
        return peer
    yield start
    for peer in started:
        peer.stop()


def mailbox(server, domain, user):
    return list(maildir_messages(server.maildir / domain / user).values())


def test_each_step_goes_over_the_wire_with_its_macros_and_quit_ends_it(make_server, peers):
    peer = peers(steps=HDR_LEADSPC)
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    body = "".join(f"line {i:06d} {'x' * 60}\r\n" for i in range(3000))  # 219 KiB: several chunks
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.test")
        client.mail("alice@example.test", ["SIZE=300000"])
        client.rcpt("bob@example.org")
        assert client.data(message(body=body))[0] == 250
    wait_until(lambda: peer.closed, 10, "the session's milter connection to close")
    letters = "".join(code for _, code, _ in peer.seen)
    assert letters.startswith("ODCH") and letters.endswith("DEQ"), letters
    [connect] = peer.commands("C")
    name, rest = connect.split(b"\0", 1)
    assert name in (b"unknown", b"localhost") and rest[:1] == b"4" and rest[3:] == b"127.0.0.1\0"
    assert struct.unpack("!H", rest[1:3])[0] > 0  # the client's port
    assert peer.commands("H") == [b"client.example.test\0"]
    assert peer.commands("M") == [b"<alice@example.test>\0SIZE=300000\0"]
    assert peer.commands("R") == [b"<bob@example.org>\0"]
    macros = b"".join(peer.commands("D"))
    for macro in (b"j\0", b"{daemon_name}\0qpgevent\0", b"{client_addr}\x00127.0.0.1\0", b"{mail_addr}\0alice@example.test\0",
                  b"{rcpt_addr}\0bob@example.org\0", b"i\0"):
        assert macro in macros, macro
    headers = dict(tuple(h.split(b"\0")[:2]) for h in peer.commands("L"))
    assert headers[b"Subject"] == b" dkim test"  # HDR_LEADSPC: the value as written
    assert headers[b"Received"].startswith(b" from client.example.test") and b"\n\t" in headers[b"Received"]
    chunks = peer.commands("B")
    assert len(chunks) == 4 and max(map(len, chunks)) <= 65535
    assert b"".join(chunks) == body.encode() + b"\r\n"  # message() ends the body with one more line end


def test_steps_the_milter_does_not_want_are_not_sent_nor_waited_for(make_server, peers):
    peer = peers({"R": None}, steps=NOHELO | NOHDRS | NR_RCPT)  # it would never answer RCPT
    server = make_server(plugins=milter_ini(("peer", peer.address, "command_timeout = 20")))
    assert send(server, message())[0] == 250
    assert peer.commands("H") == [] and peer.commands("L") == []
    assert peer.commands("R") == [b"<bob@example.org>\0"]
    assert peer.commands("N") == [b""]  # end of header is still sent
    assert headers_without_leading_space(peer)


def headers_without_leading_space(peer):
    return all(not value.startswith(b" ") for value in (h.split(b"\0")[1] for h in peer.commands("L")))


def test_end_of_message_changes_reach_the_queued_message(make_server, peers):
    changes = [packet(b"-", b"<bob@example.org>\0"), packet(b"+", b"<carol@example.test>\0"),
               packet(b"2", b"<dave@example.test>\0NOTIFY=NEVER\0"),
               packet(b"e", b"<bounces@example.test>\0"),
               header_change(b"m", 1, "Subject", "changed by the milter"),
               packet(b"h", b"X-Added\0 at the end\0"), header_change(b"i", 0, "X-First", "on top"),
               packet(b"b", b"the milter's body\r\n"), packet(b"b", b"in two packets\r\n"), packet(b"a")]
    peer = peers({"E": changes})
    server = make_server(plugins=milter_ini(("peer", peer.address), after=PER_RECIPIENT))
    assert send(server, message())[0] == 250
    assert mailbox(server, "example.org", "bob") == []
    [carol] = mailbox(server, "example.test", "carol")
    assert mailbox(server, "example.test", "dave") == [carol]
    head, body = carol.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"Return-Path: <bounces@example.test>" and lines[1] == b"X-First: on top"
    assert b"Subject: changed by the milter" in lines and lines[-1] == b"X-Added: at the end"
    assert body == b"the milter's body\r\nin two packets\r\n"


def test_discard_answers_250_and_delivers_nothing(make_server, peers):
    peer = peers({"E": [packet(b"d")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    assert send(server, message()) == (250, "2.0.0 Message accepted (discarded by mail filter peer)")
    assert delivered(server) == []
    early = peers({"R": [packet(b"d")]})  # discard at RCPT: the whole message, still 250
    server = make_server(plugins=milter_ini(("early", early.address)))
    assert send(server, message())[0] == 250 and delivered(server) == []
    assert early.commands("E") == []


def test_quarantine_is_noted_in_a_header_and_the_message_delivered(make_server, peers):
    peer = peers({"E": [packet(b"q", b"looks odd\0"), packet(b"a")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    assert send(server, message())[0] == 250
    [mail] = delivered(server)
    assert b"\r\nX-Quarantined: by mail filter peer: looks odd\r\n" in mail


def test_replycode_reject_and_tempfail_at_each_step(make_server, peers):
    peer = peers({"R": lambda data: [packet(b"y", b"550 5.1.1 no such user here\0")] if b"nobody" in data
                  else [packet(b"c")],
                  "M": lambda data: [packet(b"t")] if b"later" in data else [packet(b"c")],
                  "E": lambda data: [packet(b"r")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.test")
        assert client.mail("later@example.test") == (451, b"4.7.1 Service unavailable - try again later")
        assert client.mail("alice@example.test")[0] == 250
        assert client.rcpt("nobody@example.org") == (550, b"5.1.1 no such user here")
        assert client.rcpt("bob@example.org")[0] == 250
        assert client.data(message()) == (550, b"5.7.1 Command rejected")
    assert delivered(server) == []
    assert len(peer.commands("A")) >= 1  # the refused MAIL's transaction was aborted


def test_progress_replies_are_waited_through(make_server, peers):
    peer = peers({"E": [packet(b"p"), packet(b"p"), packet(b"h", b"X-Done\0yes\0"), packet(b"a")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    assert send(server, message())[0] == 250
    assert b"\r\nX-Done: yes\r\n" in delivered(server)[0]


def test_accept_at_connect_skips_the_milter_for_the_session(make_server, peers):
    peer = peers({"C": [packet(b"a")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    assert send(server, message())[0] == 250
    assert peer.commands("M") == [] and len(delivered(server)) == 1


def test_rset_aborts_the_milters_transaction_and_the_next_one_starts_clean(make_server, peers):
    peer = peers()
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.test")
        client.mail("alice@example.test")
        client.rset()
        client.mail("alice@example.test")
        client.rcpt("bob@example.org")
        assert client.data(message())[0] == 250
    assert peer.connections == 1 and len(peer.commands("M")) == 2 and len(peer.commands("A")) >= 1


# -- a milter that fails ---------------------------------------------------------------

FAST = ("connect_timeout = 2", "command_timeout = 1", "content_timeout = 2")


def progress_forever(data):
    """Progress every 0.05 s and never a verdict: content_timeout has to end it."""
    for _ in range(1000):
        yield packet(b"p")
        gevent.sleep(0.05)


@pytest.mark.parametrize("step, answer", [
    ("M", HANG), ("R", CLOSE), ("E", HANG), ("E", [packet(b"Z")]), ("E", [struct.pack("!I", 1 << 30) + b"c"]),
    ("E", progress_forever), ("B", [packet(b"h", b"X\0y\0")]), ("E", [packet(b"m", b"\0\0")]),
    ("E", [packet(b"+", b"<not an address\0"), packet(b"a")])],
    ids=["hang-at-mail", "close-at-rcpt", "hang-at-eom", "unknown-code", "huge-length", "progress-forever",
         "change-before-eom", "malformed-change", "bad-address"])
def test_a_failing_milter_gives_the_tempfail_reply_and_nothing_is_delivered(make_server, peers, step, answer):
    peer = peers({step: answer})
    server = make_server(plugins=milter_ini(("peer", peer.address, *FAST)))
    code, text = send(server, message())
    assert (code, text) == (451, "4.7.1 mail filter peer unavailable, try again later")
    assert delivered(server) == []


def test_on_failure_reject_and_accept(make_server, peers):
    broken = peers({"E": [packet(b"Z")]})
    server = make_server(plugins=milter_ini(("broken", broken.address, "on_failure = reject")))
    assert send(server, message()) == (550, "5.7.1 mail filter broken unavailable")
    server = make_server(plugins=milter_ini(("broken", broken.address, "on_failure = accept"),
                                            ("second", peers({"E": [packet(b"h", b"X-Second\0ok\0"), packet(b"a")]}).address)))
    assert send(server, message())[0] == 250
    [mail] = delivered(server)
    assert b"X-Second: ok" in mail


def test_a_milter_that_is_down_at_connect(make_server):
    address = f"inet:127.0.0.1:{dead_port()}"
    server = make_server(plugins=milter_ini(("down", address)))
    client = RawClient(server)
    assert client.reply() == (421, "4.7.1 mail filter down unavailable, try again later")
    assert client.is_closed_by_server()
    server = make_server(plugins=milter_ini(("down", address, "on_failure = accept")))
    assert send(server, message())[0] == 250


def test_after_a_failure_the_next_message_reconnects(make_server, peers):
    seen = []

    def close_once(data):
        seen.append(data)
        return CLOSE if len(seen) == 1 else [packet(b"c")]
    peer = peers({"M": close_once})
    server = make_server(plugins=milter_ini(("peer", peer.address, *FAST)))
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.test")
        assert client.mail("alice@example.test")[0] == 451
        assert client.mail("alice@example.test")[0] == 250
        client.rcpt("bob@example.org")
        assert client.data(message())[0] == 250
    assert peer.connections == 2 and peer.commands("H") == [b"client.example.test\0"] * 2


def test_a_hung_milter_does_not_stall_other_sessions(make_server, peers):
    peer = peers({"E": lambda data: HANG if slow else [packet(b"a")]})
    slow = True
    server = make_server(plugins=milter_ini(("peer", peer.address, "content_timeout = 8")))
    hung = gevent.spawn(send, server, message(subject="slow"))
    wait_until(lambda: peer.commands("E"), 20, "the first message to reach end of message")
    slow = False
    assert send(server, message(subject="fast"))[0] == 250  # while the first one still waits
    assert not hung.ready()
    assert hung.get(timeout=60) == (451, "4.7.1 mail filter peer unavailable, try again later")
    [mail] = delivered(server)
    assert b"Subject: fast" in mail


def test_authentication_results_under_our_id_forged_ones_hidden_the_milters_kept(make_server, peers):
    added = b'mx.example.test; dkim=fail reason="signature verification failed" header.d=example.test'
    peer = peers({"E": [packet(b"i", struct.pack("!I", 0) + b"Authentication-Results\0" + added + b"\0"),
                        packet(b"h", b"Authentication-Results\0other.example; spf=none\0"), packet(b"a")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    forged = "Authentication-Results: mx.example.test; dmarc=pass header.from=example.test\r\n"
    assert send(server, message(extra=forged))[0] == 250
    seen = b"".join(peer.commands("L"))
    assert b"dmarc=pass" not in seen  # the milter never saw the forged result
    [mail] = delivered(server)
    head = mail.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ")
    assert b"Authentication-Results: mx.example.test; dkim=fail " \
           b"reason=\"signature verification failed\" header.d=example.test\r\n" in head
    assert head.endswith(b"\r\nAuthentication-Results: other.example; spf=none") and b"dmarc=pass" not in head


def test_a_milter_on_a_unix_socket(make_server, peers, tmp_path):
    peer = peers({"E": [packet(b"h", b"X-Unix\0yes\0"), packet(b"a")]}, unix_path=str(tmp_path / "peer.sock"))
    server = make_server(plugins=milter_ini(("local", peer.address)))
    assert send(server, message())[0] == 250
    assert b"\r\nX-Unix: yes\r\n" in delivered(server)[0]


def test_replycode_421_closes_the_connection(make_server, peers):
    peer = peers({"M": [packet(b"y", b"421 4.7.0 going down\0")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    client = RawClient(server)
    client.reply()
    client.command("EHLO client.example.test")
    assert client.command("MAIL FROM:<alice@example.test>") == (421, "4.7.0 going down")
    assert client.is_closed_by_server()


def test_the_hook_timeout_covers_every_milters_timeouts_and_bad_config_is_a_load_error(plugin_harness, peers):
    harness = plugin_harness(None, after=milter_ini(("a", "inet:127.0.0.1:1", "content_timeout = 30"),
                                                    ("b", "unix:/run/b.sock"), after=""))
    [milter] = [p for p in harness.plugins if p.name == "milter"]
    assert milter.timeout == 1 + (10 + 10 + 30) + (10 + 10 + 60)
    from qpgevent.core.errors import PluginLoadError
    with pytest.raises(PluginLoadError, match="address"):
        plugin_harness(None, after=milter_ini(("a", "127.0.0.1:8891"), after=""))
    with pytest.raises(PluginLoadError, match="name at least one milter"):
        plugin_harness(None, after="[[milter]]\n")


def test_skip_stops_the_body_and_end_of_message_still_comes(make_server, peers):
    peer = peers({"B": [packet(b"s")], "E": [packet(b"h", b"X-Seen\0first chunk only\0"), packet(b"a")]})
    server = make_server(plugins=milter_ini(("peer", peer.address)))
    assert send(server, message(body=("x" * 70 + "\r\n") * 3000))[0] == 250  # 216 KiB: 4 chunks
    assert len(peer.commands("B")) == 1 and len(peer.commands("E")) == 1
    assert b"X-Seen: first chunk only" in delivered(server)[0]


def test_a_discard_ends_the_chain_for_that_message(make_server, peers):
    first, second = peers({"E": [packet(b"d")]}), peers({"E": [packet(b"r")]})
    server = make_server(plugins=milter_ini(("first", first.address), ("second", second.address)))
    assert send(server, message())[0] == 250
    assert second.commands("E") == [] and delivered(server) == []


def test_an_authenticated_client_is_named_in_the_mail_macros(make_server, peers, tmp_path):
    adduser = [sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "qpgevent-adduser"),
               "--stdin", str(tmp_path / "users.auth"), "dave@example.test"]
    assert subprocess.run(adduser, input="secret\n", text=True, capture_output=True, timeout=30).returncode == 0
    peer = peers()
    server = make_server(milter_ini(("peer", peer.address), after="[[auth/flat_file]]\n  users = users.auth\n"
                                    + RCPT_AND_QUEUE), listen="127.0.0.1:0/plainauth", auth_failure_delay=0)
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.test")
        client.login("dave@example.test", "secret")
        client.sendmail("alice@example.test", ["bob@example.org"], message())
    [mail_macros] = [data for data in peer.commands("D") if data[:1] == b"M"]
    assert b"{auth_authen}\0dave@example.test\0" in mail_macros and b"{auth_type}\0PLAIN\0" in mail_macros
