"""After the TLS handshake the server's socket sends without Nagle's delay (TCP_NODELAY).

TLS 1.3 has the server write twice in a row, its session tickets and then the reply to
EHLO; with Nagle the reply waited for the client's delayed ACK (40 ms on Linux) in every
STARTTLS session (seen with tools/smtp_tls_source.c: 50 ms per session at concurrency 1)."""

from __future__ import annotations

import smtplib
import socket

import gevent

from tls_helpers import Certs


def test_the_handshake_turns_nagle_off_on_the_server_socket(make_server, tmp_path):
    certs = Certs(tmp_path)
    certs.issue()
    server = make_server(tls_certificate="server.pem")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the kernel's default
        handshake = gevent.spawn(server.server.tls.handshake, accepted)
        with certs.client_context().wrap_socket(client, server_hostname="mx.example.test"):
            tls_sock = handshake.get(timeout=10)
        assert tls_sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        tls_sock.close()


def test_starttls_sessions_still_deliver(make_server, tmp_path):
    certs = Certs(tmp_path)
    certs.issue()
    server = make_server(tls_certificate="server.pem")
    for _ in range(3):
        with server.smtp(timeout=10) as client:
            client.starttls(context=certs.client_context())
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: s\r\n\r\nbody\r\n")
    assert len(list((server.maildir / "new").iterdir())) == 3
