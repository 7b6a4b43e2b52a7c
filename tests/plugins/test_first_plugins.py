"""The first plugins, each through the real server in this process (``make_server``).

rcpt_ok, relay, hosts_allow, count_unrecognized_commands, earlytalker, queue/maildir and
queue/discard, configured with ini text as an operator would, and driven by real clients
(smtplib, or a raw socket where a client must misbehave) over loopback. Source addresses
127.0.0.2 and up stand for other clients; ``[::1]`` for an IPv6 one.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import stat
import subprocess
import time

import pytest

from qpgevent.backends import kernel_fsync
from qpgevent.core.errors import PluginLoadError
from qpgevent.testing import RawClient, maildir_messages

MESSAGE = b"Subject: test\r\nFrom: a@client.test\r\n\r\nhello\r\n"
MAILDIR = """
[[queue/maildir]]
  path = Maildir
"""


def smtp_from(server, source: str | None = None) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname="client.example.test",
                        source_address=(source, 0) if source else None, timeout=10)


def rcpt(server, address: str, source: str | None = None) -> tuple[int, bytes]:
    """The reply to RCPT TO:<address> in a fresh session."""
    with smtp_from(server, source) as client:
        client.ehlo()
        assert client.mail("a@client.test")[0] == 250
        return client.rcpt(address)


# -- rcpt_ok --------------------------------------------------------------------

RCPT_OK = """
[[rcpt_ok]]
  domains = example.test, Other.Example
  rcpthosts = rcpthosts
""" + MAILDIR


@pytest.fixture
def rcpthosts(tmp_path):
    path = tmp_path / "rcpthosts"
    path.write_text("# local domains\nlisted.test\n\n.wild.test   # and every subdomain\n")
    return path


@pytest.mark.parametrize("address", [
    "bob@example.test", "BOB@EXAMPLE.TEST", "x@other.example",
    "x@mx.example.test",  # me
    "x@listed.test", "x@a.wild.test", "x@deep.sub.wild.test",
    "postmaster", "Postmaster",  # bare <postmaster>, RFC 5321 4.5.1
])
def test_rcpt_ok_accepts_local_recipients(make_server, rcpthosts, address):
    server = make_server(RCPT_OK)
    assert rcpt(server, address)[0] == 250


@pytest.mark.parametrize("address", [
    "x@elsewhere.test",
    "x@wild.test",  # ".wild.test" covers subdomains only
    "x@notexample.test", "x@sub.example.test",  # plain entries are not suffixes
    "postmaster@elsewhere.test",
    "x@listed.test.evil",
])
def test_rcpt_ok_refuses_relaying(make_server, rcpthosts, address):
    server = make_server(RCPT_OK)
    assert rcpt(server, address) == (550, b"5.7.1 Relaying denied")


def test_rcpt_ok_rereads_rcpthosts_when_it_changes(make_server, rcpthosts):
    server = make_server(RCPT_OK)
    assert rcpt(server, "x@listed.test")[0] == 250
    assert rcpt(server, "x@fresh.test")[0] == 550
    before = os.stat(rcpthosts).st_mtime_ns
    rcpthosts.write_text("fresh.test\n")
    os.utime(rcpthosts, ns=(before + 10**9, before + 10**9))  # a change even on coarse clocks
    assert rcpt(server, "x@fresh.test")[0] == 250
    assert rcpt(server, "x@listed.test") == (550, b"5.7.1 Relaying denied")
    assert rcpt(server, "x@example.test")[0] == 250


def test_rcpt_ok_fails_closed_when_rcpthosts_vanishes(make_server, rcpthosts):
    server = make_server(RCPT_OK)
    rcpthosts.unlink()
    code, text = rcpt(server, "x@listed.test")
    assert (code, text[:5]) == (451, b"4.3.0")


def test_rcpt_ok_accepts_anything_from_a_relay_client(make_server):
    server = make_server("""
    [[relay]]
      clients = 127.0.0.1
    [[rcpt_ok]]
      domains = example.test
    """ + MAILDIR)
    assert rcpt(server, "x@elsewhere.test")[0] == 250
    assert rcpt(server, "x@elsewhere.test", source="127.0.0.2") == (550, b"5.7.1 Relaying denied")


def test_rcpt_ok_with_reject_0_leaves_the_decision_open(make_server):
    server = make_server("""
    [[rcpt_ok]]
      domains = example.test
      reject = 0
    """ + MAILDIR)
    assert rcpt(server, "x@example.test")[0] == 250
    # Nobody said OK: not consent to relay, a temporary refusal.
    assert rcpt(server, "x@elsewhere.test")[0] == 450


# -- relay -----------------------------------------------------------------------

def relay_config(**options: str) -> str:
    lines = "\n".join(f"  {key} = {value}" for key, value in options.items())
    return f"[[relay]]\n{lines}\n[[rcpt_ok]]\n  domains = example.test\n" + MAILDIR


def test_relay_clients_in_an_ipv4_network_may_relay(make_server):
    server = make_server(relay_config(clients="10.0.0.0/8, 127.0.0.0/24"))
    assert rcpt(server, "x@elsewhere.test", source="127.0.0.1")[0] == 250
    assert rcpt(server, "x@elsewhere.test", source="127.0.0.255")[0] == 250
    assert rcpt(server, "x@elsewhere.test", source="127.0.1.1") == (550, b"5.7.1 Relaying denied")


def test_relay_clients_in_an_ipv6_network_may_relay(make_server):
    server = make_server(relay_config(clients="::1/128"), listen="[::1]:0")
    assert server.host == "::1"
    assert rcpt(server, "x@elsewhere.test")[0] == 250


def test_relay_ipv6_client_outside_the_networks_may_not_relay(make_server):
    server = make_server(relay_config(clients="2001:db8::/32, 127.0.0.1"), listen="[::1]:0")
    assert rcpt(server, "x@elsewhere.test") == (550, b"5.7.1 Relaying denied")
    assert rcpt(server, "x@example.test")[0] == 250


def test_relay_never_wins_over_clients(make_server):
    server = make_server(relay_config(clients="127.0.0.0/8", never="127.0.0.2"))
    assert rcpt(server, "x@elsewhere.test", source="127.0.0.1")[0] == 250
    assert rcpt(server, "x@elsewhere.test", source="127.0.0.2") == (550, b"5.7.1 Relaying denied")


def test_relay_only_refuses_every_recipient_from_others(make_server):
    server = make_server(relay_config(clients="127.0.0.2", only="yes"))
    assert rcpt(server, "x@example.test", source="127.0.0.1") == (550, b"5.7.1 Relaying denied")
    assert rcpt(server, "x@elsewhere.test", source="127.0.0.2")[0] == 250


# -- hosts_allow -------------------------------------------------------------------

def hosts_allow(**options: str) -> str:
    lines = "\n".join(f"  {key} = {value}" for key, value in options.items())
    return f"[[hosts_allow]]\n{lines}\n[[rcpt_ok]]\n  domains = example.test\n" + MAILDIR


def greeted(server, source: str) -> RawClient:
    client = RawClient(server, source)
    assert client.reply()[0] == 220
    return client


def test_hosts_allow_refuses_one_connection_too_many_from_an_address(make_server):
    server = make_server(hosts_allow(max_conn_ip="3"))
    open_ = [greeted(server, "127.0.0.1") for _ in range(3)]
    extra = RawClient(server, "127.0.0.1")
    assert extra.reply() == (421, "4.7.0 too many connections from 127.0.0.1, try again later")
    assert extra.is_closed_by_server()
    other = greeted(server, "127.0.0.2")  # another address has its own count
    assert open_[0].command("QUIT")[0] == 221
    assert open_[0].is_closed_by_server()
    again = greeted(server, "127.0.0.1")  # the count went down with the QUIT
    for client in [*open_, extra, other, again]:
        client.close()


def test_hosts_allow_rules_first_match_wins(make_server):
    rules = '"127.0.0.2 OK", "127.0.0.3 DENY spam source", "127.0.0.4 DENYSOFT", "127.0.0.0/8 DENY"'
    server = make_server(hosts_allow(max_conn_ip="1", rules=rules))
    trusted = [greeted(server, "127.0.0.2") for _ in range(3)]  # OK: the limit does not apply
    for source, expected in [
        ("127.0.0.3", (554, "5.7.1 spam source")),
        ("127.0.0.4", (421, "4.7.0 127.0.0.4 is not welcome here")),
        ("127.0.0.5", (554, "5.7.1 127.0.0.5 is not welcome here")),
    ]:
        client = RawClient(server, source)
        assert client.reply() == expected
        assert client.is_closed_by_server()
        client.close()
    for client in trusted:
        client.close()


def test_hosts_allow_exempt_networks_have_no_limit(make_server):
    server = make_server(hosts_allow(max_conn_ip="1", exempt="127.0.0.3/32, 10.0.0.0/8"))
    exempt = [greeted(server, "127.0.0.3") for _ in range(3)]
    first = greeted(server, "127.0.0.1")
    second = RawClient(server, "127.0.0.1")
    assert second.reply()[0] == 421
    for client in [*exempt, first, second]:
        client.close()


def test_hosts_allow_bad_rule_is_a_load_error(make_server):
    with pytest.raises(PluginLoadError, match="hosts_allow.*127.0.0.1 MAYBE"):
        make_server(hosts_allow(rules='"127.0.0.1 MAYBE"'))


# -- count_unrecognized_commands --------------------------------------------------------

@pytest.mark.parametrize("count", [1, 3])
def test_count_unrecognized_commands_closes_at_the_count(make_server, count):
    server = make_server(f"[[count_unrecognized_commands]]\n  count = {count}\n[[rcpt_ok]]\n"
                         "  domains = example.test\n" + MAILDIR)
    client = greeted(server, "127.0.0.1")
    assert client.command("EHLO client.example.test")[0] == 250
    for number in range(1, count):
        assert client.command(f"FOO{number}") == (500, "5.5.1 Unrecognized command")
        # Known commands, even out of sequence, do not count.
        assert client.command("NOOP")[0] == 250
        assert client.command("RCPT TO:<x@example.test>")[0] == 503
    code, text = client.command("BAR")
    assert (code, text) == (521, f"5.5.1 Closing connection, {count} unrecognized commands."
                                 " Perhaps you should read RFC 5321?")
    assert client.is_closed_by_server()
    client.close()


def test_count_unrecognized_commands_default_is_4(make_server):
    server = make_server("[[count_unrecognized_commands]]\n[[rcpt_ok]]\n  domains = example.test\n"
                         + MAILDIR)
    with smtp_from(server) as client:
        for _ in range(3):
            assert client.docmd("XYZZY")[0] == 500
        assert client.docmd("XYZZY")[0] == 521
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


# -- earlytalker --------------------------------------------------------------------

def earlytalker(**options: str) -> str:
    lines = "\n".join(f"  {key} = {value}" for key, value in options.items())
    return f"[[earlytalker]]\n{lines}\n[[rcpt_ok]]\n  domains = example.test\n" + MAILDIR


def test_earlytalker_refuses_a_client_that_talks_first(make_server):
    server = make_server(earlytalker(wait="0.5"))
    client = RawClient(server)
    client.sock.sendall(b"EHLO impatient.example.test\r\n")
    assert client.reply() == (554, "5.7.1 Connecting host started transmitting before SMTP greeting")
    assert client.is_closed_by_server()
    client.close()


def test_earlytalker_serves_a_client_that_waits_for_the_greeting(make_server):
    server = make_server(earlytalker(wait="0.5"))
    started = time.monotonic()
    with smtp_from(server) as client:  # smtplib reads the 220 before it says anything
        assert time.monotonic() - started >= 0.45  # the greeting was held back
        assert client.sendmail("a@client.test", ["bob@example.test"], MESSAGE) == {}
    assert len(maildir_messages(server.maildir)) == 1


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_earlytalker_with_reject_0_only_notes_it(make_server):
    server = make_server(earlytalker(wait="0.5", reject="0", loglevel="info"))
    records = Records()
    logger = logging.getLogger("qpgevent.plugin.earlytalker")
    logger.addHandler(records)
    try:
        client = RawClient(server)
        client.sock.sendall(b"EHLO impatient.example.test\r\n")
        assert client.reply()[0] == 220
        assert client.reply()[0] == 250  # its early EHLO is then served
        assert client.command("QUIT")[0] == 221
        client.close()
    finally:
        logger.removeHandler(records)
    assert "127.0.0.1 talked before the greeting" in records.messages
    assert any("started transmitting before SMTP greeting" in m for m in records.messages)


def test_earlytalker_does_not_delay_relay_clients(make_server):
    server = make_server("[[relay]]\n  clients = 127.0.0.1\n" + earlytalker(wait="5"))
    started = time.monotonic()
    client = RawClient(server)
    client.sock.sendall(b"EHLO impatient.example.test\r\n")
    assert client.reply()[0] == 220
    assert time.monotonic() - started < 4
    assert client.reply()[0] == 250
    client.close()


# -- queue/maildir -------------------------------------------------------------------

def send(server, sender: str = "a@client.test", recipients=("bob@example.test",),
         message: bytes = MESSAGE) -> tuple[int, bytes]:
    """The reply to the end of DATA."""
    with smtp_from(server) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250
        return client.data(message)


def test_maildir_delivers_into_new_with_return_path_and_mode_0600(make_server):
    server = make_server()
    code, text = send(server, recipients=("bob@example.test", "carol@example.test"))
    assert code == 250
    (name,) = os.listdir(server.maildir / "new")
    assert text == f"2.0.0 Queued as {name}".encode()
    content = (server.maildir / "new" / name).read_bytes()
    assert content.startswith(b"Return-Path: <a@client.test>\r\nReceived: from client.example.test")
    assert content.endswith(b"\r\n" + MESSAGE)
    assert stat.S_IMODE(os.stat(server.maildir / "new" / name).st_mode) == 0o600
    assert os.listdir(server.maildir / "tmp") == []
    assert (server.maildir / "cur").is_dir()


def test_maildir_null_sender_return_path(make_server):
    server = make_server()
    assert send(server, sender="")[0] == 250
    (content,) = maildir_messages(server.maildir).values()
    assert content.startswith(b"Return-Path: <>\r\n")


def test_maildir_each_message_is_its_own_file(make_server):
    server = make_server()
    with smtp_from(server) as client:
        for number in range(5):
            body = f"Subject: {number}\r\n\r\nmessage {number}\r\n".encode()
            assert client.sendmail("a@client.test", ["bob@example.test"], body) == {}
    messages = maildir_messages(server.maildir).values()
    assert sorted(m.rsplit(b"\r\n", 2)[-2] for m in messages) == [b"message %d" % n for n in range(5)]


def durability_syscalls(server) -> list[str]:
    """Deliver one message while strace watches this process: its fsync and rename calls."""
    trace = server.maildir.parent / f"strace-{time.monotonic_ns()}.out"
    strace = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=/^(fsync|fdatasync|rename|renameat2?)$",
                               "-o", str(trace), "-p", str(os.getpid())], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not _traced():
            assert strace.poll() is None, f"strace failed: {strace.stderr.read()!r}"
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)
        assert send(server)[0] == 250
    finally:
        strace.terminate()
        strace.communicate(timeout=10)
    calls = re.findall(r"^\d+\s+(f\w*sync|rename\w*)\(.*= 0$", trace.read_text(), re.MULTILINE)
    return ["rename" if call.startswith("rename") else "fsync" for call in calls]


def _traced() -> bool:
    """Every thread of this process has strace attached."""
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/status") as status:
            if not any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in status):
                return False
    return True


@pytest.mark.parametrize("fsync, expected", [
    # The file before it is renamed into new/, then new/ itself so that the rename lasts.
    ("yes", ["fsync", "rename", "fsync"]),
    ("no", ["rename"]),
])
def test_maildir_fsync_option(make_server, fsync, expected, monkeypatch):
    # The fsync system calls of the worker-thread path (Linux AIO off): the kernel's own path
    # (io_submit) is traced in test_queue_maildir_group_commit.py.
    monkeypatch.setattr(kernel_fsync, "_here", None)
    server = make_server(f"[[rcpt_ok]]\n  domains = example.test\n{MAILDIR}  fsync = {fsync}\n")
    assert durability_syscalls(server) == expected
    assert len(maildir_messages(server.maildir)) == 1


def test_maildir_unwritable_tmp_is_a_temporary_failure(make_server):
    server = make_server()
    tmp = server.maildir / "tmp"
    tmp.rmdir()
    tmp.write_text("not a folder")  # root ignores modes; a file in the way stops anyone
    assert send(server) == (451, b"4.3.0 cannot store the message right now, try again later")
    assert maildir_messages(server.maildir) == {}
    tmp.unlink()
    tmp.mkdir()
    assert send(server)[0] == 250  # no restart needed once the Maildir is fixed
    assert len(maildir_messages(server.maildir)) == 1


def test_maildir_unwritable_new_is_a_temporary_failure_and_leaves_no_tmp_file(make_server):
    server = make_server()
    new = server.maildir / "new"
    new.rmdir()
    new.write_text("not a folder")
    assert send(server) == (451, b"4.3.0 cannot store the message right now, try again later")
    assert os.listdir(server.maildir / "tmp") == []


def test_maildir_removes_stale_tmp_files_at_start(tmp_path, make_server):
    tmp = tmp_path / "Maildir" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "stale").write_text("left by a crash two days ago")
    (tmp / "fresh").write_text("maybe still being written")
    two_days_ago = time.time() - 48 * 3600
    os.utime(tmp / "stale", (two_days_ago, two_days_ago))
    make_server()
    assert os.listdir(tmp) == ["fresh"]


def test_maildir_bad_fsync_value_is_a_load_error(make_server):
    with pytest.raises(PluginLoadError, match=r"queue/maildir.*fsync"):
        make_server(f"{MAILDIR}  fsync = sometimes\n")


# -- queue/discard --------------------------------------------------------------------

def test_discard_says_250_and_keeps_nothing(make_server, tmp_path):
    server = make_server("[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n",
                         size_threshold=0)
    assert send(server, message=MESSAGE * 100) == (250, b"2.0.0 Queued (discarded)")
    with smtp_from(server) as client:
        assert client.sendmail("a@client.test", ["bob@example.test"], MESSAGE) == {}
    assert not (tmp_path / "Maildir").exists()
    spool = tmp_path / "spool" / "tmp"
    assert not spool.exists() or os.listdir(spool) == []
