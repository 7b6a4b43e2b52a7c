"""Issue 21, item 2: ``command_timeout`` and ``data_timeout`` bound each wait, not their total.

RFC 5321 4.5.3.2: the timeouts are per read. The driver's reusable timer used to resume
the time left from the previous wait (libev's stop keeps it), so a steady upload got
``421 4.4.2`` once ``data_timeout`` had passed in all, and with ``park_after = 0`` a busy
session was cut at ``command_timeout``. Each client here waits well within the timeout
between its sends, and sends for several timeouts in total.
"""

from __future__ import annotations

import time

from hardening_helpers import client_in_data

from qpgevent.testing import RawClient, maildir_messages

TIMEOUT = 1.0
STEP = TIMEOUT / 5  # the client's pause between sends: a fifth of the timeout


def paced(seconds: float) -> None:
    """The client's own pace (not synchronisation: the server is never waited on)."""
    time.sleep(seconds)


def test_a_slow_steady_message_longer_than_data_timeout_gets_250(make_server):
    server = make_server(data_timeout=TIMEOUT)
    client = client_in_data(server)
    try:
        client.sock.sendall(b"Subject: slow\r\n\r\n")
        started = time.monotonic()
        lines = 0
        while time.monotonic() - started < 4 * TIMEOUT:
            paced(STEP)
            client.sock.sendall(b"line %d %s\r\n" % (lines, b"x" * 500))  # well above min_data_rate
            lines += 1
        code, text = client.command(".")
        assert code == 250, text
    finally:
        client.close()
    [message] = maildir_messages(server.maildir).values()
    assert message.endswith(b"line %d %s\r\n" % (lines - 1, b"x" * 500))


def test_an_active_session_outlives_command_timeout_without_parking(make_server):
    server = make_server(command_timeout=TIMEOUT, park_after=0)
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        assert client.command("HELO c.test")[0] == 250
        started = time.monotonic()
        while time.monotonic() - started < 4 * TIMEOUT:
            paced(STEP)
            code, text = client.command("NOOP")
            assert code == 250, text
        assert client.command("QUIT")[0] == 221
    finally:
        client.close()


def test_silence_past_the_timeout_is_still_cut(make_server):
    """The other side: one wait longer than data_timeout gets 421 4.4.2."""
    server = make_server(data_timeout=TIMEOUT)
    client = client_in_data(server)
    try:
        client.sock.sendall(b"Subject: stalled\r\n\r\nbody\r\n")
        code, text = client.reply()
        assert (code, text.split()[0]) == (421, "4.4.2"), text
    finally:
        client.close()
    assert maildir_messages(server.maildir) == {}
