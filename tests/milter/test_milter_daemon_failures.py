"""Each real milter killed or hung (SIGSTOP) in the middle of a session: the client gets the
configured fallback reply (451 by default; with on_failure = accept the message is delivered
once), nothing is lost or doubled, and other sessions of the same process keep going."""

from __future__ import annotations

import os
import signal

import gevent
import pytest

from milter_daemons import ClamavMilter, OpenDkim, OpenDmarc, Rspamd
from milter_helpers import delivered, message, milter_ini

FAST = ("connect_timeout = 3", "command_timeout = 3", "content_timeout = 3")
KINDS = ["opendkim", "clamav", "rspamd", "opendmarc"]


@pytest.fixture
def daemon(request, clamd):
    starters = {"opendkim": OpenDkim, "clamav": lambda: ClamavMilter(clamd), "rspamd": Rspamd,
                "opendmarc": OpenDmarc}
    started = starters[request.param]()
    yield started
    if started.process is not None and started.process.poll() is None:
        os.killpg(started.process.pid, signal.SIGCONT)
    started.close()


def open_transaction(server):
    client = server.smtp(timeout=60)
    client.ehlo("client.example.test")
    assert client.mail("alice@example.test")[0] == 250
    assert client.rcpt("bob@example.org")[0] == 250
    return client


@pytest.mark.parametrize("daemon", KINDS, indirect=True)
def test_killed_after_rcpt_the_message_gets_451_and_is_not_delivered(make_server, daemon):
    server = make_server(plugins=milter_ini(("filter", daemon.address, *FAST)))
    client = open_transaction(server)
    daemon.kill()
    assert client.data(message()) == (451, b"4.7.1 mail filter filter unavailable, try again later")
    client.quit()
    assert delivered(server) == []


@pytest.mark.parametrize("daemon", KINDS, indirect=True)
def test_killed_with_on_failure_accept_the_message_is_delivered_once(make_server, daemon):
    server = make_server(plugins=milter_ini(("filter", daemon.address, *FAST, "on_failure = accept")))
    client = open_transaction(server)
    daemon.kill()
    assert client.data(message())[0] == 250
    client.quit()
    assert len(delivered(server)) == 1


@pytest.mark.parametrize("daemon", KINDS, indirect=True)
def test_hung_mid_session_451_after_the_timeout_and_other_sessions_go_on(make_server, daemon):
    # long enough for the other session to finish first on a loaded machine
    server = make_server(plugins=milter_ini(("filter", daemon.address, *FAST[:2], "content_timeout = 8")))
    client = open_transaction(server)
    os.killpg(daemon.process.pid, signal.SIGSTOP)
    waiting = gevent.spawn(client.data, message())
    # meanwhile, in the same process and hub, another server (same Maildir) delivers a message
    other = make_server()
    with other.smtp(timeout=60) as second:
        assert second.sendmail("alice@example.test", ["bob@example.test"], message(subject="other")) == {}
    assert not waiting.ready()
    assert waiting.get(timeout=60) == (451, b"4.7.1 mail filter filter unavailable, try again later")
    os.killpg(daemon.process.pid, signal.SIGCONT)
    client.quit()
    [mail] = delivered(server)
    assert b"Subject: other" in mail
