"""qpgevent.ident against a real TCP ident responder on loopback (RFC 1413).

The responder is written here rather than run as oidentd: oidentd only ever gives a
well-formed USERID or NO-USER, and these tests need garbage, wrong ports, over-long
lines and silence as well. Each test asks with its own client port; the responder
answers per port from ``REPLIES``.
"""

from __future__ import annotations

import time

import gevent
import pytest
from gevent.server import StreamServer

from qpgevent import ident

SILENT = b"silent"
HANG_UP = b"hang up"
REPLIES = {
    40001: b"40001 , 25 : USERID : UNIX : alice\r\n",
    40002: b"40002,25:USERID:UNIX:root\r\n",  # oidentd writes no blanks
    40003: b"40003 , 25 : ERROR : NO-USER\r\n",
    40004: b"hello, I am not an ident server\r\n",
    40005: SILENT,
    40006: b"40007 , 25 : USERID : UNIX : mallory\r\n",  # answers another question
    40008: HANG_UP,
    40009: b"40009 , 25 : USERID : OTHER,UTF-8 : we:ird id \r\n",
    40010: b"40010 , 25 : USERID : UNIX : " + b"x" * 5000,
    40011: b"40011 , 25 : USERID : UNIX : bob",  # no CRLF, then the connection closes
    40012: b"40012 , 25 : USERID : UNIX : \x1b[31mevil\r\n",
    40013: b"40013 , 25 : USERID : UNIX : \xc3\xa9milie\r\n",
    40014: b"40014 , 25 : USERID :  : nobody\r\n",  # no operating system
    40015: b"40015 , 25 : USERID : UNIX : \r\n",  # no user id
}


class Responder:
    """A tiny RFC 1413 server on 127.0.0.1: reads one question, answers from REPLIES."""

    def __init__(self) -> None:
        self.questions: list[tuple[str, bytes]] = []
        self.server = StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.port = self.server.server_port

    def handle(self, sock, address) -> None:
        sock.settimeout(10)
        question = b""
        while b"\n" not in question and len(question) < 1000:
            chunk = sock.recv(1000)
            if not chunk:
                return
            question += chunk
        self.questions.append((address[0], question))
        port = int(question.split(b",")[0])
        reply = REPLIES.get(port, b"%d , 25 : ERROR : UNKNOWN-ERROR\r\n" % port)
        if reply == SILENT:
            sock.recv(1)  # until the asker gives up and closes
        elif reply != HANG_UP:
            sock.sendall(reply)

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def responder():
    server = Responder()
    yield server
    server.stop()


def ask(responder, client_port, timeout=2.0, local_ip="127.0.0.1"):
    return ident.lookup("127.0.0.1", client_port, local_ip, 25, timeout=timeout, port=responder.port)


def test_user_id(responder):
    assert ask(responder, 40001) == "alice"
    assert ask(responder, 40002) == "root"


def test_question_is_client_port_then_ours(responder):
    ask(responder, 40001)
    assert responder.questions[-1] == ("127.0.0.1", b"40001 , 25\r\n")


def test_asks_from_our_side_of_the_smtp_connection(responder):
    # The ident host must see the address the SMTP client talked to.
    assert ask(responder, 40001, local_ip="127.0.0.2") == "alice"
    assert responder.questions[-1][0] == "127.0.0.2"


def test_error_reply_is_none(responder):
    assert ask(responder, 40003) is None


def test_garbage_is_none(responder):
    assert ask(responder, 40004) is None


def test_reply_to_other_ports_is_none(responder):
    assert ask(responder, 40006) is None


def test_hang_up_is_none(responder):
    assert ask(responder, 40008) is None


def test_user_id_may_hold_colons_and_other_opsys(responder):
    assert ask(responder, 40009) == "we:ird id"


def test_overlong_reply_is_none(responder):
    assert ask(responder, 40010) is None


def test_reply_ended_by_close_is_taken(responder):
    assert ask(responder, 40011) == "bob"


def test_control_characters_are_refused(responder):
    assert ask(responder, 40012) is None


def test_utf8_user_id(responder):
    assert ask(responder, 40013) == "émilie"


def test_missing_fields_are_none(responder):
    assert ask(responder, 40014) is None
    assert ask(responder, 40015) is None


def test_silent_server_times_out(responder):
    started = time.monotonic()
    assert ask(responder, 40005, timeout=0.5) is None
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5, elapsed


def test_nobody_listening_is_none_at_once():
    free = StreamServer(("127.0.0.1", 0), lambda sock, address: None)
    free.init_socket()
    port = free.server_port
    free.close()  # the port is now closed: connection refused
    started = time.monotonic()
    assert ident.lookup("127.0.0.1", 40001, "127.0.0.1", 25, timeout=2.0, port=port) is None
    assert time.monotonic() - started < 0.5


def test_lookups_are_cooperative(responder):
    # 50 silent ident servers with a 0.5 s timeout: 0.5 s in all, not 25 s.
    started = time.monotonic()
    jobs = [gevent.spawn(ask, responder, 40005, 0.5) for _ in range(50)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    elapsed = time.monotonic() - started
    assert [job.value for job in jobs] == [None] * 50
    assert elapsed < 2.0, elapsed


@pytest.mark.parametrize("line, expected", [
    (b"6193, 23 : USERID : UNIX : stjohns\r\n", "stjohns"),  # RFC 1413's example
    (b"6195, 23 : ERROR : NO-USER\r\n", None),
    (b"6193, 23 : userid : unix : lower\r\n", "lower"),
    (b"6193 , 23 : USERID : UNIX\r\n", None),
    (b"6193 , x : USERID : UNIX : a\r\n", None),
    (b"6193 23 : USERID : UNIX : a\r\n", None),
])
def test_parse_reply(line, expected):
    assert ident.parse_reply(line, 6193, 23) == expected
