"""A worker holding thousands of sessions has socket descriptors past 1023, where ``select()``
stops: the session code that waits for input must work there too.

The descriptors below 1100 are taken up first (duplicates of /dev/null), so that every
socket of these tests is numbered past select()'s limit, as in a worker of
``tools/bench idle --connections 30000``.
"""

from __future__ import annotations

import os

import pytest

from qpgevent.testing import RawClient, wait_until

#: Past FD_SETSIZE (1024), the limit of select().
HIGH = 1100


@pytest.fixture
def high_descriptors():
    """Hold descriptors up to HIGH open for the test, so every new socket is numbered past it."""
    held = []
    try:
        while not held or held[-1] < HIGH:
            held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)


def test_earlytalker_waits_on_a_high_descriptor(make_server, high_descriptors):
    server = make_server("[[earlytalker]]\n  wait = 0.3\n[[rcpt_ok]]\n  domains = example.test\n"
                         "[[queue/maildir]]\n  path = Maildir\n")
    rude = RawClient(server)
    assert rude.sock.fileno() > HIGH
    rude.sock.sendall(b"EHLO impatient.example.test\r\n")
    assert rude.reply()[0] == 554  # it talked during the wait: seen on a descriptor past 1023
    rude.close()
    polite = RawClient(server)
    assert polite.reply()[0] == 220  # waited for the greeting: the wait timed out, not failed
    polite.close()


def test_stopping_wakes_parked_sessions_on_high_descriptors(make_server, high_descriptors):
    server = make_server(park_after="0.05")
    clients = [RawClient(server) for _ in range(5)]
    for client in clients:
        assert client.reply()[0] == 220
        assert client.command("NOOP")[0] == 250
    wait_until(lambda: len(server.server.parking) == 5, timeout=30, what="five parked sessions")
    server.stop(5.0)
    for client in clients:
        # Each idle session is told why it ends, then closed (the stop checks for input first).
        assert client.reply() == (421, "4.3.2 Service shutting down, try again later")
        assert client.is_closed_by_server()
        client.close()
