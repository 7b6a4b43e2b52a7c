"""How the driver writes replies: one plain send() when they fit, the per-wait timeout when not.

The driver hands replies to the kernel with one send() on the OS socket and waits (under
``command_timeout``) only for what the socket's buffer did not take. These tests make the
buffers overflow with a real client over loopback: a plugin verb answers 100 KiB per
command, more than loopback's buffers hold in a few commands; a client that reads slowly
still gets every reply, in order and whole; a client that stops reading is cut off at the
timeout, and the server goes on serving others.
"""

from __future__ import annotations

import socket
import time

import gevent

from qpgevent.testing import DEFAULT_PLUGINS, wait_until

SENDER = "a@client.test"
RECIPIENT = "bob@example.test"
BIGS = 100  #: pipelined XBIG commands: their replies (10 MB) overflow any loopback buffer
LINES = 1000  #: lines of one XBIG reply (100 octets each)
XBIG = '''
"""xbig: answers XBIG with LINES numbered lines (a test of the server's writes)."""
from qpgevent.plugin import DECLINED, OK, Plugin


class Xbig(Plugin):
    verbs = ("XBIG",)

    def hook_command(self, session, verb, argument):
        if verb != "XBIG":
            return DECLINED
        return OK, [f"{argument} line {number:05d} " + "x" * 80 for number in range(LINES)]
'''.replace("LINES", str(LINES))


def big_server(make_server, tmp_path, **settings):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "xbig.py").write_text(XBIG, encoding="utf-8")
    return make_server("[[xbig]]\n" + DEFAULT_PLUGINS, **settings)


def small_client(port: int) -> socket.socket:
    """A client whose receive buffer is as small as the kernel allows (set before connect)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def read_replies(sock: socket.socket, count: int) -> list[list[bytes]]:
    """The next ``count`` complete replies (each a list of its lines), read in small pieces."""
    buffer, replies, reply = b"", [], []
    while len(replies) < count:
        chunk = sock.recv(997)  # an odd size: reply lines are cut at every possible place
        assert chunk, f"closed after {len(replies)} replies"
        buffer += chunk
        *lines, buffer = buffer.split(b"\r\n")
        for line in lines:
            reply.append(line)
            if line[3:4] == b" ":
                replies.append(reply)
                reply = []
    assert buffer == b"" and reply == []
    return replies


def pipeline_bigs_reading_slowly(sock: socket.socket) -> None:
    """EHLO, BIGS XBIG commands and QUIT pipelined on ``sock`` while its replies are read in
    small pieces: each comes whole and in order."""
    commands = b"EHLO client.example.test\r\n" + b"".join(b"XBIG %d\r\n" % n for n in range(BIGS))
    sender = gevent.spawn(sock.sendall, commands + b"QUIT\r\n")
    replies = read_replies(sock, BIGS + 2)
    sender.get(timeout=30)
    assert replies[0][-1].startswith(b"250 ")
    for number, reply in enumerate(replies[1:-1]):
        assert reply == [b"250%s2.0.0 %d line %05d " % (b"-" if line < LINES - 1 else b" ", number, line)
                         + b"x" * 80 for line in range(LINES)]
    assert replies[-1][0].startswith(b"221 2.0.0 ")


def pipeline_until_blocked(sock: socket.socket) -> None:
    """Pipeline XBIG on ``sock`` until our own send blocks: the server stopped reading because
    its replies cannot be written, and we read none of them."""
    sock.settimeout(0.5)
    sock.sendall(b"EHLO client.example.test\r\n")
    bigs = b"XBIG 1\r\n" * 100
    sent_for = time.monotonic()
    try:
        while time.monotonic() - sent_for < 20:
            sock.sendall(bigs)
    except TimeoutError:
        pass
    assert time.monotonic() - sent_for < 20, "the server read everything: the test did not block it"


def test_a_slow_reader_gets_every_pipelined_reply_whole_and_in_order(make_server, tmp_path):
    server = big_server(make_server, tmp_path)
    sock = small_client(server.port)
    try:
        assert read_replies(sock, 1)[0][0].startswith(b"220 ")
        pipeline_bigs_reading_slowly(sock)
        assert sock.recv(100) == b""
    finally:
        sock.close()


def test_a_client_that_stops_reading_is_cut_off_at_command_timeout(make_server, tmp_path):
    server = big_server(make_server, tmp_path, command_timeout=1.0)
    sock = small_client(server.port)
    try:
        pipeline_until_blocked(sock)
        # Past command_timeout (the wait for the client to take our replies) the session ends.
        wait_until(lambda: not server.server.sessions, 15, "the session of a client that does not read ended")
    finally:
        sock.close()
    body = b"Subject: after a stuck client\r\n\r\nstill here\r\n"
    with server.smtp(timeout=10) as client:
        assert client.sendmail(SENDER, [RECIPIENT], body) == {}
