"""How the driver writes replies: one plain send() when they fit, the per-wait timeout when not.

The driver hands replies to the kernel with one send() on the OS socket and waits (under
``command_timeout``) only for what the socket's buffer did not take. These tests make the
buffers overflow with a real client over loopback: a client that reads slowly still gets
every reply, in order and whole; a client that stops reading is cut off at the timeout,
and the server goes on serving others.
"""

from __future__ import annotations

import socket
import time

import gevent

from qpgevent.testing import wait_until

SENDER = "a@client.test"
RECIPIENT = "bob@example.test"
HELLOS = 20000  #: pipelined EHLOs: their replies (several MB) overflow any loopback buffer


def small_client(port: int) -> socket.socket:
    """A client whose receive buffer is as small as the kernel allows (set before connect)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """The next ``count`` complete replies (their last lines), read in small pieces."""
    buffer, last_lines = b"", []
    while len(last_lines) < count:
        chunk = sock.recv(997)  # an odd size: reply lines are cut at every possible place
        assert chunk, f"closed after {len(last_lines)} replies"
        buffer += chunk
        *lines, buffer = buffer.split(b"\r\n")
        last_lines += [line for line in lines if line[3:4] == b" "]
    assert buffer == b"" or len(last_lines) == count
    return last_lines


def test_a_slow_reader_gets_every_pipelined_reply_whole_and_in_order(make_server):
    server = make_server()
    sock = small_client(server.port)
    try:
        assert read_replies(sock, 1)[0].startswith(b"220 ")
        sender = gevent.spawn(sock.sendall, b"EHLO client.example.test\r\n" * HELLOS + b"QUIT\r\n")
        replies = read_replies(sock, HELLOS + 1)
        sender.get(timeout=30)
        assert replies[0].startswith(b"250 ") and replies[:HELLOS] == [replies[0]] * HELLOS
        assert replies[-1].startswith(b"221 2.0.0 ")
        assert sock.recv(100) == b""
    finally:
        sock.close()


def test_a_client_that_stops_reading_is_cut_off_at_command_timeout(make_server):
    server = make_server(command_timeout=1.0)
    sock = small_client(server.port)
    try:
        # Pipeline until our own send blocks: the server stopped reading because its replies
        # cannot be written, and we read none of them.
        sock.settimeout(0.5)
        hellos = b"EHLO client.example.test\r\n" * 1000
        sent_for = time.monotonic()
        try:
            while time.monotonic() - sent_for < 20:
                sock.sendall(hellos)
        except TimeoutError:
            pass
        assert time.monotonic() - sent_for < 20, "the server read everything: the test did not block it"
        # Past command_timeout (the wait for the client to take our replies) the session ends.
        wait_until(lambda: not server.server.sessions, 15, "the session of a client that does not read ended")
    finally:
        sock.close()
    body = b"Subject: after a stuck client\r\n\r\nstill here\r\n"
    with server.smtp(timeout=10) as client:
        assert client.sendmail(SENDER, [RECIPIENT], body) == {}
