"""The summary line's ``last_reply`` is what the client was told last, however the session
ended; and an IPv6 peer is written ``[::1]:41258`` in the connect, via-proxy and PROXY lines.

The real server in this process, real clients on loopback (``::1`` for IPv6); the lines
are the records the server logs (caplog).
"""

from __future__ import annotations

import logging
import smtplib
import socket

import gevent

from qpgevent.engine.conversation import Conversation
from qpgevent.server.steering import WorkerControls
from qpgevent.testing import RawClient, wait_until


def summaries(caplog) -> list[dict]:
    return [record.fields for record in caplog.records if record.getMessage().startswith("disconnect: ")]


def last_reply(caplog) -> int:
    (summary,) = wait_until(lambda: summaries(caplog), 20, "the summary line")
    return summary["last_reply"]


def connect_ids(caplog) -> list[str]:
    return [record.conn for record in caplog.records if record.getMessage().startswith("connect from ")]


def test_a_client_that_only_read_the_banner_was_told_220(server, caplog):
    with caplog.at_level(logging.INFO):
        client = RawClient(server)
        assert client.reply()[0] == 220
        client.close()
        assert last_reply(caplog) == 220


def test_quit_ends_on_221(server, caplog):
    with caplog.at_level(logging.INFO):
        with server.smtp(timeout=10) as client:
            assert client.ehlo()[0] == 250
        assert last_reply(caplog) == 221


def test_a_timeout_ends_on_421(make_server, caplog):
    server = make_server(command_timeout=0.5)
    with caplog.at_level(logging.INFO):
        client = RawClient(server)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO client.example.test")[0] == 250
            assert client.reply()[0] == 421  # said nothing more: timed out
        finally:
            client.close()
        assert last_reply(caplog) == 421


def test_shutdown_ends_on_421_not_on_the_last_250(server, caplog):
    with caplog.at_level(logging.INFO):
        client = RawClient(server)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO client.example.test")[0] == 250
            stopping = gevent.spawn(server.server.stop, 0)
            assert client.reply()[0] == 421
            stopping.join(20)
        finally:
            client.close()
        assert last_reply(caplog) == 421


def test_a_kicked_session_ends_on_421(server, caplog, tmp_path):
    with caplog.at_level(logging.INFO):
        client = RawClient(server)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO client.example.test")[0] == 250
            (conn,) = connect_ids(caplog)
            assert WorkerControls(server.server, str(tmp_path / "run")).kick(conn)
            assert client.reply()[0] == 421
        finally:
            client.close()
        assert last_reply(caplog) == 421


def test_an_internal_error_ends_on_421(server, caplog, monkeypatch):
    # A bug in the core cannot be had on purpose: this one is put in, in RSET's handler.
    def broken(self, command):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Conversation, "on_rset", broken)
    with caplog.at_level(logging.INFO):
        client = RawClient(server)
        try:
            assert client.reply()[0] == 220
            assert client.command("EHLO client.example.test")[0] == 250
            assert client.command("RSET")[0] == 421
        finally:
            client.close()
        assert last_reply(caplog) == 421
    assert any("internal error" in record.getMessage() for record in caplog.records)


def test_an_ipv6_client_is_written_in_brackets(make_server, caplog):
    server = make_server(listen="[::1]:0")
    with caplog.at_level(logging.INFO):
        with smtplib.SMTP("::1", server.port, local_hostname="client.example.test", timeout=10) as client:
            client_port = client.sock.getsockname()[1]
            assert client.ehlo()[0] == 250
        wait_until(lambda: summaries(caplog), 20, "the summary line")
    messages = [record.getMessage() for record in caplog.records]
    assert f"connect from [::1]:{client_port} to [::1]:{server.port}" in messages, messages
    assert not any(f"::1:{client_port}" in message.replace(f"[::1]:{client_port}", "") for message in messages)


def proxied(server, header: bytes) -> tuple[socket.socket, int]:
    sock = socket.create_connection(("::1", server.port), timeout=10)
    sock.sendall(header)
    return sock, sock.getsockname()[1]


def test_ipv6_through_a_proxy_is_written_in_brackets(make_server, caplog):
    server = make_server(listen="[::1]:0", proxy_trusted="::1")
    with caplog.at_level(logging.DEBUG):
        sock, proxy_port = proxied(server, b"PROXY TCP6 2001:db8::5 2001:db8::25 41258 25\r\n")
        with sock:
            assert sock.recv(4096).startswith(b"220 ")
            sock.sendall(b"QUIT\r\n")
            assert sock.recv(4096).startswith(b"221 ")
        wait_until(lambda: summaries(caplog), 20, "the summary line")
        bad, bad_port = proxied(server, b"PROXY NONSENSE\r\n")
        with bad:
            assert bad.recv(4096).startswith(b"421 ")
        # The refusal is logged by the server's greenlet, maybe after our read: wait for it.
        wait_until(lambda: any("bad PROXY header" in record.getMessage() for record in caplog.records), 20,
                   "the bad header's log line")
    messages = [record.getMessage() for record in caplog.records]
    assert (f"connect from [2001:db8::5]:41258 to [2001:db8::25]:25 via proxy [::1]:{proxy_port}"
            in messages), messages
    assert any(message.endswith(f"proxy [::1]:{proxy_port}: PROXY v1 for [2001:db8::5]:41258")
               for message in messages), messages
    assert any(f"proxy [::1]:{bad_port}: bad PROXY header" in message for message in messages), messages
    for port in (proxy_port, bad_port):
        assert not any(f"::1:{port}" in message.replace(f"[::1]:{port}", "") for message in messages)
