"""Issue 21, item 7: a session deadline and a minimum rate, so that no client holds a slot for ever.

Each wait is bounded by ``command_timeout`` / ``data_timeout``; a client that sends one
octet just within each could keep its slot without end. ``[limits] session_timeout``
bounds the whole session; ``[limits] min_data_rate`` bounds each request (a command
line, a message's data) to its timeout plus a second per ``min_data_rate`` octets. Both
end with ``421 4.4.2``. Hostile clients here trickle, each piece well within the timeout.
"""

from __future__ import annotations

import time

from hardening_helpers import client_in_data

from qpgevent.testing import RawClient, maildir_messages

TIMEOUT = 2.0
STEP = 0.2  # the client's pause between pieces, a tenth of the timeout


def paced(seconds: float) -> None:
    """The hostile client's own pace (not synchronisation: the server is never waited on)."""
    time.sleep(seconds)


def trickle_until_refused(client: RawClient, piece: bytes, within: float) -> tuple[int, str]:
    """Send ``piece`` every STEP until the server answers; its reply. Fails if the client is
    still trickling after ``within`` seconds (a reply to silence would prove nothing)."""
    client.sock.settimeout(STEP)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            client.sock.sendall(piece)
        except OSError:  # closed: the reply is in our buffer
            break
        try:
            chunk = client.sock.recv(4096)
        except TimeoutError:
            continue
        client._buffer += chunk
        break
    else:
        raise AssertionError(f"still trickling after {within}s")
    client.sock.settimeout(10)
    return client.reply()


def test_a_busy_session_ends_at_session_timeout(make_server):
    server = make_server(session_timeout=3, command_timeout=TIMEOUT, park_after=0)
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        started = time.monotonic()
        code, text = 250, ""
        while code == 250 and time.monotonic() - started < 60:
            paced(STEP)
            code, text = client.command("NOOP")
        assert (code, text.split()[0]) == (421, "4.4.2"), text
        assert time.monotonic() - started >= 2.5  # not before its time (a bound, not a timing)
        assert client.is_closed_by_server()
    finally:
        client.close()


def test_a_command_trickled_an_octet_at_a_time_gets_421(make_server):
    server = make_server(command_timeout=TIMEOUT, min_data_rate=100)
    client = RawClient(server)
    try:
        assert client.reply()[0] == 220
        code, text = trickle_until_refused(client, b"N", within=30)
        assert (code, text.split()[0]) == (421, "4.4.2"), text
    finally:
        client.close()


def test_a_message_trickled_below_min_data_rate_gets_421_and_is_not_delivered(make_server):
    server = make_server(data_timeout=TIMEOUT, min_data_rate=100)
    client = client_in_data(server)
    try:
        code, text = trickle_until_refused(client, b"x", within=30)
        assert (code, text.split()[0]) == (421, "4.4.2"), text
    finally:
        client.close()
    assert maildir_messages(server.maildir) == {}


def test_a_message_above_min_data_rate_is_delivered(make_server):
    """The same pace with bigger pieces keeps above the rate, for longer than data_timeout."""
    server = make_server(data_timeout=TIMEOUT, min_data_rate=100)
    client = client_in_data(server)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2 * TIMEOUT:
            paced(STEP)
            client.sock.sendall(b"y" * 98 + b"\r\n")  # 500 octets/s
        code, text = client.command(".")
        assert code == 250, text
    finally:
        client.close()
    assert len(maildir_messages(server.maildir)) == 1
