"""Draining for a balancer: ``/health`` says 503 before the listeners close.

On SIGTERM with ``[server] drain_delay``, the master first makes the admin ``/health``
answer ``503 draining`` and goes on serving for that many seconds (the balancer's health
check takes the host out meanwhile), then stops as always. ``/health`` needs no token and
answers any address: it only tells whether to send new sessions here.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import time

from qpgevent.testing import wait_until

from test_admin import get

MESSAGE = b"Subject: draining\r\n\r\nsent while the host drains\r\n"


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


def test_health_is_up_then_draining_while_sessions_are_still_served(server_process):
    server = server_process(admin_listen="127.0.0.1:0", admin_token="secret", drain_delay=30)
    code, _, body = get(server.admin_url + "/health")
    assert (code, body) == (200, b"up\n")
    assert get(server.admin_url + "/status.json")[0] == 401  # the token still guards the rest
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: get(server.admin_url + "/health")[0] == 503, 10, "/health saying draining", 0.05)
    assert get(server.admin_url + "/health")[2] == b"draining\n"
    # Still accepting while the balancer takes us out: a new client is served to the end.
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="late.client.test", timeout=30) as client:
        assert client.sendmail("a@client.test", ["bob@example.test"], MESSAGE) == {}
    assert server.process.poll() is None
    assert "draining: /health answers 503, the listeners close in 30" in server.log()
    # A second signal does not wait out the 30 seconds.
    server.process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert server.wait(25) == 0
    assert time.monotonic() - started < 25
    assert refused(server.port)


def test_without_drain_delay_the_listeners_close_at_once(server_process):
    server = server_process(admin_listen="127.0.0.1:0")
    server.process.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert "draining:" not in server.log()
    assert refused(server.port)
