"""500 concurrent sessions of 10 messages each through the shipped default configuration.

The real ``qpgevent`` command runs as a child process on a copy of ``qpsmtpd.ini`` (its
plugins and settings exactly as shipped; only ``--listen 127.0.0.1:0`` on the command
line). 500 smtplib clients in greenlets of this process connect at once, from 50 source
addresses (127.0.0.2 to 127.0.0.51, ten each: a real MX sees many addresses, and the
shipped hosts_allow limit is 20 per address), and each sends 10 messages over its one
session. Every one of the 5,000 messages must be answered 250 and be in ``Maildir/new``
exactly once.
"""

from __future__ import annotations

import collections
import resource
import shutil
import smtplib
import time
from pathlib import Path

import gevent

from qpgevent.testing import ServerProcess

SHIPPED_INI = Path(__file__).resolve().parents[2] / "qpsmtpd.ini"
SESSIONS = 500
MESSAGES = 10
PER_ADDRESS = 10  # under the shipped hosts_allow max_conn_ip = 20


def raise_fd_limit(needed: int) -> None:
    """Two sockets per session (ours and the server's child inherits the limit) and then some."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    assert soft == resource.RLIM_INFINITY or soft >= needed, (
        f"file descriptor limit {soft} (hard {hard}) is below the {needed} this test needs")


def message_id(session: int, number: int) -> str:
    return f"s{session:03d}-m{number:02d}"


def message_of(ident: str) -> bytes:
    return (f"Message-Id: <{ident}@client.test>\r\nX-Test-Id: {ident}\r\nSubject: load {ident}\r\n"
            f"\r\nmessage {ident}\r\n").encode()


def test_500_sessions_of_10_messages_are_all_delivered_exactly_once(tmp_path):
    raise_fd_limit(4 * SESSIONS + 256)
    ini = tmp_path / "qpsmtpd.ini"
    shutil.copyfile(SHIPPED_INI, ini)
    server = ServerProcess(ini, "--listen", "127.0.0.1:0")
    accepted: list[str] = []
    started = time.monotonic()
    try:
        def session(n: int) -> None:
            source = f"127.0.0.{2 + n // PER_ADDRESS}"
            with smtplib.SMTP("127.0.0.1", server.port, local_hostname=f"client{n}.example.test",
                              source_address=(source, 0), timeout=120) as smtp:
                for number in range(MESSAGES):
                    ident = message_id(n, number)
                    refused = smtp.sendmail(f"sender{n}@client.test", [f"rcpt{n}@example.test"],
                                            message_of(ident))
                    assert refused == {}
                    accepted.append(ident)

        greenlets = [gevent.spawn(session, n) for n in range(SESSIONS)]
        gevent.joinall(greenlets, timeout=240)
        elapsed = time.monotonic() - started
        unfinished = [g for g in greenlets if not g.ready()]
        failed = [g.exception for g in greenlets if g.ready() and not g.successful()]
        assert not unfinished, f"{len(unfinished)} sessions still running after {elapsed:.0f}s"
        assert not failed, f"{len(failed)} sessions failed, first: {failed[0]!r}"
    finally:
        if server.process.poll() is None:
            server.terminate()
    print(f"\n{SESSIONS * MESSAGES} messages in {SESSIONS} sessions: {elapsed:.1f}s")

    expected = {message_id(n, number) for n in range(SESSIONS) for number in range(MESSAGES)}
    assert sorted(accepted) == sorted(expected)
    new = tmp_path / "spool" / "Maildir" / "new"
    delivered = collections.Counter()
    for path in new.iterdir():
        content = path.read_bytes()
        header = content.partition(b"\r\n\r\n")[0]
        (ident,) = [line[len(b"X-Test-Id: "):].decode() for line in header.split(b"\r\n")
                    if line.startswith(b"X-Test-Id: ")]
        assert content.endswith(f"\r\n\r\nmessage {ident}\r\n".encode()), path.name
        delivered[ident] += 1
    assert sum(delivered.values()) == SESSIONS * MESSAGES
    assert set(delivered) == expected
    assert [ident for ident, count in delivered.items() if count != 1] == []
    assert list((tmp_path / "spool" / "Maildir" / "tmp").iterdir()) == []
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
