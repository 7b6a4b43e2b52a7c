"""Hostile and clumsy clients over raw sockets, where we need control of every byte.

Binary junk, floods of bad commands, garbage pipelined between good commands, clients
that leave at once or half-close their side, invalid UTF-8: each gets 5xx replies (or
the 421 of the bad-command budget) and never a crash, a hang or a leaked session; a
client after them is served normally. Last, PIPELINING (RFC 2920): replies come back
in order and in one write, which we check on the wire with Linux ``TCP_INFO``.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import gevent

from qpgevent.testing import maildir_messages, strip_trace

SENDER = "a@client.test"
RECIPIENT = "bob@example.test"


class RawClient:
    """SMTP over a bare socket: exact bytes out, replies parsed, every recv() kept."""

    def __init__(self, server, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.buffer = b""
        self.reads: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """The next reply: its code, and its lines (without codes) joined by newlines."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"closed by the server; unparsed: {self.buffer!r}")
                self.reads.append(chunk)
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(lines[0][:3]), "\n".join(x[4:].decode() for x in lines)

    def replies_until_closed(self) -> tuple[list[tuple[int, str]], str]:
        """Every reply up to the server's close, and how it closed ("eof" or "reset").

        A server that closes while our unread commands sit in its receive buffer makes
        the kernel send RST instead of FIN (RFC 1122 4.2.2.13); Linux still hands us
        the replies that came before it, so both endings are a clean close here.
        """
        replies = []
        try:
            while True:
                replies.append(self.reply())
        except EOFError:
            return replies, "eof"
        except ConnectionResetError:
            assert b"\r\n" not in self.buffer, self.buffer
            return replies, "reset"

    def close(self) -> None:
        self.sock.close()


def tcp_received(sock: socket.socket) -> tuple[int, int]:
    """(octets, data segments) received on ``sock``: Linux ``struct tcp_info``.

    ``tcpi_bytes_received`` is at offset 128, ``tcpi_data_segs_in`` at 152 (Linux 4.6+).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= 156, "this kernel's tcp_info has no tcpi_data_segs_in"
    return struct.unpack_from("Q", info, 128)[0], struct.unpack_from("I", info, 152)[0]


def junk_lines(seed: int, count: int) -> list[bytes]:
    """Random bytes without CR or LF, each line holding a NUL and a 0xFF."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        noise = bytes(b for b in rng.randbytes(80) if b not in b"\r\n")
        lines.append(noise[:20] + b"\x00" + noise[20:40] + b"\xff" + noise[40:])
    return lines


def assert_served(server, subject: str) -> None:
    """A new client delivers a message: the server shrugged off whatever came before."""
    body = f"Subject: {subject}\r\n\r\nstill serving\r\n".encode()
    with server.smtp(timeout=5) as client:
        assert client.sendmail(SENDER, [RECIPIENT], body) == {}
    assert body in {strip_trace(m) for m in maildir_messages(server.maildir).values()}


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.01)


def test_binary_junk_lines_get_500_and_the_session_goes_on(server):
    client = RawClient(server)
    assert client.reply()[0] == 220
    for line in junk_lines(5321, 8):
        client.send(line + b"\r\n")
        code, text = client.reply()
        assert code == 500 and text[:6] in ("5.5.1 ", "5.5.2 "), (line, text)
    client.send(b"EHLO client.example.test\r\n")
    assert client.reply()[0] == 250
    client.send(b"NOOP\r\n")
    assert client.reply()[0] == 250
    client.close()
    assert_served(server, "after junk")


def test_random_byte_blob_uses_up_the_error_budget_and_closes(server):
    client = RawClient(server)
    assert client.reply()[0] == 220
    client.send(random.Random(2920).randbytes(64 * 1024))
    replies, _ = client.replies_until_closed()
    budget = server.settings.max_bad_commands
    assert len(replies) == budget + 1
    assert all(code // 100 == 5 for code, _ in replies[:-1]), replies
    assert replies[-1][0] == 421 and replies[-1][1].startswith("4.7.0 ")
    client.close()
    assert_served(server, "after a random blob")


def test_flood_of_1000_bad_commands_gets_a_bounded_answer(server):
    client = RawClient(server)
    assert client.reply()[0] == 220
    client.send(b"MAIL FROM:<a@client.test>\r\n" * 1000)  # no EHLO: 503 each
    started = time.monotonic()
    replies, _ = client.replies_until_closed()
    assert time.monotonic() - started < 3
    budget = server.settings.max_bad_commands
    assert replies[:-1] == [(503, "5.5.1 please say hello first ...")] * budget
    assert replies[-1][0] == 421 and replies[-1][1].startswith("4.7.0 ")
    client.close()
    wait_until(lambda: not server.server.sessions)
    assert_served(server, "after a flood")


def test_garbage_pipelined_between_valid_commands(server):
    client = RawClient(server)
    assert client.reply()[0] == 220
    client.send(b"EHLO client.example.test\r\n"
                b"\x00\xff\xfe\r\n"
                b"MAIL FROM:<a@client.test>\r\n"
                b"GARBAGE in the pipeline\r\n"
                b"RCPT TO:<bob@example.test>\r\n"
                b"\xc3\x28 not utf-8\r\n"
                b"RCPT TO:<carol@example.test>\r\n"
                b"DATA\r\n")
    codes = [client.reply()[0] for _ in range(8)]
    assert codes == [250, 500, 250, 500, 250, 500, 250, 354]
    body = b"Subject: mixed\r\n\r\n..a stuffed dot\r\n"
    client.send(body + b".\r\nQUIT\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 221
    assert client.replies_until_closed() == ([], "eof")
    (delivered,) = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == body.replace(b"\r\n..", b"\r\n.")


def test_clients_that_leave_at_once_leak_no_session(make_server):
    server = make_server(max_connections=10)
    for n in range(50):
        sock = socket.create_connection((server.host, server.port), timeout=5)
        if n % 2:
            # Linger 0: close with RST instead of FIN, the rudest way to leave.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_until(lambda: not server.server.sessions)
    # With max_connections=10, any leaked session among the 50 would refuse us now.
    assert_served(server, "after 50 quitters")


def test_half_close_mid_command_ends_the_session_at_once(make_server):
    # A long command_timeout: only the client's EOF can end this session quickly.
    server = make_server(command_timeout=30)
    client = RawClient(server)
    assert client.reply()[0] == 220
    client.send(b"EHLO client.example.test\r\nNOOP\r\nNOO")
    client.sock.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    # The complete commands are answered; the unfinished one is not a command.
    replies, ending = client.replies_until_closed()
    assert [code for code, _ in replies] == [250, 250] and ending == "eof"
    assert time.monotonic() - started < 3
    client.close()
    wait_until(lambda: not server.server.sessions)
    assert_served(server, "after a half-close")


def test_half_close_mid_data_delivers_nothing(make_server):
    server = make_server(command_timeout=30, data_timeout=30)
    client = RawClient(server)
    assert client.reply()[0] == 220
    client.send(b"EHLO client.example.test\r\nMAIL FROM:<a@client.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert [client.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    client.send(b"Subject: cut short\r\n\r\nno final dot\r\n")
    client.sock.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    assert client.replies_until_closed() == ([], "eof")
    assert time.monotonic() - started < 3
    client.close()
    assert maildir_messages(server.maildir) == {}
    assert_served(server, "after a cut message")
    assert len(maildir_messages(server.maildir)) == 1


def test_invalid_utf8_commands_get_500_5_5_2(server):
    client = RawClient(server)
    assert client.reply()[0] == 220
    client.send(b"EHLO client.example.test\r\n")
    assert client.reply()[0] == 250
    for line in (b"NOOP caf\xe9",  # Latin-1
                 b"NOOP \xc0\xaf",  # an overlong encoding of "/"
                 b"MAIL FROM:<caf\xe9@client.test> SMTPUTF8"):  # RFC 6531 3.3: UTF-8 only
        client.send(line + b"\r\n")
        assert client.reply() == (500, "5.5.2 Syntax error: command is not valid UTF-8"), line
    # The same address in UTF-8 is fine (RFC 6531), and the session never lost its place.
    client.send("MAIL FROM:<café@client.test> SMTPUTF8\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                .encode())
    assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
    client.send(b"Subject: utf8\r\n\r\nok\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()
    assert len(maildir_messages(server.maildir)) == 1


def test_pipelined_replies_come_in_order_in_one_write(server):
    """RFC 2920 3.1: the server may batch replies; 3.2: it must keep their order."""
    client = RawClient(server)
    assert client.reply()[0] == 220
    octets_before, segments_before = tcp_received(client.sock)
    reads_before = len(client.reads)
    client.send(b"EHLO client.example.test\r\n"
                b"MAIL FROM:<a@client.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\n"
                b"RCPT TO:<carol@example.test>\r\n"
                b"DATA\r\n")
    ehlo, mail, bob, carol, data = (client.reply() for _ in range(5))
    assert ehlo[0] == 250 and "PIPELINING" in ehlo[1].split("\n")
    assert mail[0] == 250 and mail[1].startswith("2.1.0 <a@client.test>")
    assert bob[0] == 250 and bob[1].startswith("2.1.5 <bob@example.test>")
    assert carol[0] == 250 and carol[1].startswith("2.1.5 <carol@example.test>")
    assert data == (354, "go ahead")
    assert client.buffer == b""
    # All five replies in one recv(), and on the wire in one TCP segment: one write.
    assert len(client.reads) - reads_before == 1
    octets, segments = tcp_received(client.sock)
    assert octets - octets_before == len(client.reads[-1])
    assert segments - segments_before == 1

    client.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert client.reply()[0] == 250
    assert client.reply()[0] == 221
    assert tcp_received(client.sock)[1] - segments == 1
    assert client.replies_until_closed() == ([], "eof")
    client.close()
    assert len(maildir_messages(server.maildir)) == 1
