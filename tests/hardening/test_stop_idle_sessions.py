"""Issue 21, item 8: on SIGTERM, idle sessions are closed at once with 421.

They used to hold the stop for the whole ``[server] shutdown_timeout``: a parked session
was woken to wait in a greenlet for a command that might never come. Now a session
with no transaction under way and nothing sent says ``421 4.3.2`` and ends; one in the
middle of a transaction still gets its ``shutdown_timeout`` to finish. The real process,
with a shutdown_timeout far longer than the test waits.
"""

from __future__ import annotations

import signal

from qpgevent.testing import RawClient

SHUTDOWN_TIMEOUT = 120  # the test fails long before: the stop must not wait for it


def test_an_idle_session_gets_421_at_once_and_the_server_exits(server_process):
    process = server_process(workers=1, shutdown_timeout=SHUTDOWN_TIMEOUT, park_after=0.05)
    client = RawClient(process)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        process.process.send_signal(signal.SIGTERM)
        code, text = client.reply()  # the client's socket gives up after 10 s
        assert (code, text.split()[0]) == (421, "4.3.2"), text
        assert client.is_closed_by_server()
    finally:
        client.close()
    assert process.wait(SHUTDOWN_TIMEOUT / 4) == 0


def test_a_session_in_a_transaction_may_still_finish(server_process):
    process = server_process(workers=1, shutdown_timeout=SHUTDOWN_TIMEOUT, park_after=0.05)
    client = RawClient(process)
    try:
        assert client.reply()[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        assert client.command("MAIL FROM:<a@c.test>")[0] == 250
        process.process.send_signal(signal.SIGTERM)
        assert client.command("RCPT TO:<bob@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        code, text = client.command("Subject: late\r\n\r\nstill delivered\r\n.")
        assert code == 250, text
    finally:
        client.close()
    assert process.wait(SHUTDOWN_TIMEOUT / 4) == 0
    assert len(list((process.maildir / "new").iterdir())) == 1
