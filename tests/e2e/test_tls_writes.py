"""How the server writes inside TLS: without Nagle's delay, each batch of replies handed to
OpenSSL at once, and when the client reads slowly or not at all, as on a plain socket.

TLS 1.3 has the server write twice in a row, its session tickets and then the reply to
EHLO; with Nagle the reply waited for the client's delayed ACK (40 ms on Linux) in every
STARTTLS session (seen with tools/smtp_tls_source.c: 50 ms per session at concurrency 1).
The replies that do not fit the socket's buffer (the XBIG plugin of test_driver_writes:
100 KiB per command, pipelined) make OpenSSL ask for the same data again until the client
has read enough.
"""

from __future__ import annotations

import socket

import gevent

from qpgevent.testing import wait_until

from test_driver_writes import (RECIPIENT, SENDER, big_server, pipeline_bigs_reading_slowly, pipeline_until_blocked,
                                read_replies, small_client)
from tls_helpers import Certs


def tls_big_server(make_server, tmp_path, **settings):
    certs = Certs(tmp_path)
    certs.issue()
    server = big_server(make_server, tmp_path, tls_certificate="server.pem", **settings)
    server.certs = certs
    return server


def starttls(server, sock: socket.socket):
    """Greeting, EHLO, STARTTLS on ``sock``; the TLS socket."""
    assert read_replies(sock, 1)[0][0].startswith(b"220 ")
    sock.sendall(b"EHLO client.example.test\r\nSTARTTLS\r\n")
    assert [reply[-1][:4] for reply in read_replies(sock, 2)] == [b"250 ", b"220 "]
    return server.certs.client_context().wrap_socket(sock, server_hostname="mx.example.test")


def test_the_handshake_turns_nagle_off_on_the_server_socket(make_server, tmp_path):
    server = tls_big_server(make_server, tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the kernel's default
        handshake = gevent.spawn(server.server.tls.handshake, accepted)
        with server.certs.client_context().wrap_socket(client, server_hostname="mx.example.test"):
            tls_sock = handshake.get(timeout=10)
        assert tls_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        tls_sock.close()


def test_a_slow_tls_reader_gets_every_pipelined_reply_whole_and_in_order(make_server, tmp_path):
    server = tls_big_server(make_server, tmp_path)
    sock = starttls(server, small_client(server.port))
    try:
        pipeline_bigs_reading_slowly(sock)
    finally:
        sock.close()


def test_a_tls_client_that_stops_reading_is_cut_off_at_command_timeout(make_server, tmp_path):
    server = tls_big_server(make_server, tmp_path, command_timeout=1.0)
    sock = starttls(server, small_client(server.port))
    try:
        pipeline_until_blocked(sock)
        wait_until(lambda: not server.server.sessions, 15, "the session of a TLS client that does not read ended")
    finally:
        sock.close()
    with server.smtp(timeout=10) as client:
        client.starttls(context=server.certs.client_context())
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: after\r\n\r\nstill here\r\n") == {}
    assert len(list((server.maildir / "new").iterdir())) == 1
