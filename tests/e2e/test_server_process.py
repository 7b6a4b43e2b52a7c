"""The real ``python -m qpgevent`` in a child process: signals, graceful stop, a big
message under a memory bound, and listening on IPv4 and IPv6 at once.

SIGTERM and SIGINT both mean "stop gracefully": close the listeners at once (a new
client is refused by the kernel), give the sessions in flight ``shutdown_timeout``
seconds to finish, say ``421 4.3.2`` to those still there (RFC 5321 3.8: 421 is the
reply a server gives when it must close), and exit 0.
"""

from __future__ import annotations

import hashlib
import re
import signal
import smtplib
import socket
import time
from collections.abc import Iterator

import gevent
import pytest

from qpgevent.testing import DEFAULT_PLUGINS, maildir_messages, peak_memory_kib, strip_trace

SENDER = "a@client.test"
RECIPIENT = "bob@example.test"
STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]
MiB = 1 << 20


def wait_for_log(process, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in process.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{process.log()}"
        gevent.sleep(0.02)


def assert_closed(client: smtplib.SMTP) -> None:
    with pytest.raises(smtplib.SMTPServerDisconnected, match=r"^Connection unexpectedly closed$"):
        client.getreply()


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_idle_server_exits_0_promptly(server_process, signum):
    process = server_process()
    started = time.monotonic()
    process.process.send_signal(signum)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 5
    assert "stopped" in process.log()


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: s.name)
def test_transaction_in_flight_finishes_after_the_signal(server_process, signum):
    process = server_process(shutdown_timeout=30)
    body = b"Subject: in flight\r\n\r\nsent after the signal\r\n"
    with process.smtp(timeout=10) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        started = time.monotonic()
        process.process.send_signal(signum)
        wait_for_log(process, "stopping: waiting up to")
        assert client.data(body)[0] == 250
    # The server went as soon as its last session did, not at shutdown_timeout.
    assert process.wait(10) == 0
    assert time.monotonic() - started < 10
    (delivered,) = maildir_messages(process.maildir).values()
    assert strip_trace(delivered) == body


def test_new_connections_are_refused_while_stopping(server_process):
    process = server_process(shutdown_timeout=30)
    with process.smtp(timeout=10) as lingering:
        lingering.ehlo()
        process.process.send_signal(signal.SIGTERM)
        # The master and every worker hold the listening socket: it is gone once all closed it.
        wait_for_log(process, "stopped accepting: the listeners are closed in every process")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", process.port), timeout=5)
        assert lingering.noop()[0] == 250  # the session in flight is still served
    assert process.wait(10) == 0


def test_sessions_left_at_shutdown_timeout_get_421(server_process):
    process = server_process(shutdown_timeout=0.5)
    idle, sending = process.smtp(timeout=10), process.smtp(timeout=10)
    idle.ehlo()
    sending.ehlo()
    assert sending.mail(SENDER)[0] == 250
    assert sending.rcpt(RECIPIENT)[0] == 250
    assert sending.docmd("DATA")[0] == 354
    sending.send(b"Subject: never finished\r\n\r\nhalf")
    started = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    for client in (idle, sending):
        code, text = client.getreply()
        assert code == 421 and text.startswith(b"4.3.2 "), text
        assert_closed(client)
    assert time.monotonic() - started >= 0.4
    assert process.wait(10) == 0
    assert time.monotonic() - started < 8
    assert maildir_messages(process.maildir) == {}


def big_message(chunks: int) -> Iterator[bytes]:
    """The message, 1 MiB of body at a time: a header, then 128-octet numbered lines.

    Every 1024th line starts with a dot, so the client must stuff it and the server
    must unstuff it (RFC 5321 4.5.2).
    """
    yield b"Subject: fifty mebibytes\r\nFrom: a@client.test\r\n\r\n"
    filler = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 8)
    for k in range(chunks):
        lines = []
        for j in range(MiB // 128):
            head = b"%c%03d:%05d " % (46 if j % 1024 == 0 else 76, k, j)
            start = (k + j) % 36
            lines.append(head + filler[start:start + 126 - len(head)] + b"\r\n")
        yield b"".join(lines)


def test_50_mib_message_is_byte_exact_in_bounded_memory(server_process):
    process = server_process(max_message_size=100 * MiB, workers=1)
    (pid,) = process.worker_pids()  # the worker holds the session, not the master
    with process.smtp(timeout=30) as client:
        # Warm up the code paths (spool, Maildir, thread pool) before the baseline.
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: warm-up\r\n\r\nhi\r\n") == {}
        before = peak_memory_kib(pid)
        size = sum(len(chunk) for chunk in big_message(50))
        digest = hashlib.sha256()
        assert client.mail(SENDER, [f"SIZE={size}"])[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        client.putcmd("DATA")
        assert client.getreply()[0] == 354
        for chunk in big_message(50):
            digest.update(chunk)
            client.send((b"\r\n" + chunk).replace(b"\r\n.", b"\r\n..")[2:])  # dot-stuffing
        client.send(b".\r\n")
        code, text = client.getreply()
        assert code == 250, text
        after = peak_memory_kib(pid)
    assert size > 50 * MiB
    growth_mib = (after - before) / 1024
    assert growth_mib < 25, f"peak memory grew by {growth_mib:.1f} MiB for a 50 MiB message"
    delivered = [m for m in maildir_messages(process.maildir).values() if b"fifty mebibytes" in m]
    assert len(delivered) == 1
    assert hashlib.sha256(strip_trace(delivered[0])).hexdigest() == digest.hexdigest()
    # The body spilled to spool_dir past size_threshold; the temporary file is gone.
    assert list((process.maildir.parent / "spool" / "tmp").iterdir()) == []
    assert process.terminate(10) == 0


def test_listens_on_ipv4_and_ipv6_loopback(server_process):
    process = server_process(DEFAULT_PLUGINS, "--listen", "127.0.0.1:0", "--listen", "[::1]:0")
    listening = dict(re.findall(r"listening on (\S+):(\d+)", process.log()))
    assert "127.0.0.1" in listening
    clients = [("127.0.0.1", int(listening["127.0.0.1"]))]
    if ipv6_loopback_works():
        clients.append(("::1", int(listening["[::1]"])))
    else:
        # Documented: an IPv6 address the machine cannot bind is skipped with a warning.
        assert "[::1]" not in listening and "not listening on [::1]:0" in process.log()
    for host, port in clients:
        body = f"Subject: over {host}\r\n\r\nhi\r\n".encode()
        with smtplib.SMTP(host, port, local_hostname="client.example.test", timeout=10) as client:
            assert client.sendmail(SENDER, [RECIPIENT], body) == {}
    delivered = maildir_messages(process.maildir).values()
    assert len(delivered) == len(clients)
    for host, _ in clients:
        # Our Received header names the client address as the listener saw it.
        assert any(f"[{host}])".encode() in m and f"over {host}".encode() in m for m in delivered)
    assert process.terminate(10) == 0
