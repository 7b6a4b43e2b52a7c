"""A plugin adds a verb, an EHLO keyword and a MAIL parameter: black-box, over a real socket.

The real server (in process) with the test plugin ``tests/data/plugins/xping.py`` and the
usual rcpt_ok + queue/maildir; smtplib as the client. Without the plugin the same verb is
unknown (500) and the same parameter is refused (555): the core stays strict, a plugin
widens it only by declaring what it adds. The in-memory tests of every extension point
are in ``tests/plugins/test_extensions.py``.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from qpgevent.testing import DEFAULT_PLUGINS, maildir_messages

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")
MESSAGE = b"Subject: priority\r\nFrom: a@client.test\r\n\r\nbody\r\n"


@pytest.fixture
def xping_server(make_server):
    return make_server("[[xping]]\n" + DEFAULT_PLUGINS, plugin_dirs=PLUGIN_DIR)


def test_the_plugin_adds_an_ehlo_keyword_and_a_verb(xping_server):
    with xping_server.smtp(timeout=10) as client:
        client.ehlo()
        assert client.has_extn("xping")
        assert client.docmd("XPING", "hello") == (250, b"2.0.0 pong hello")
        assert client.docmd("XPING") == (250, b"2.0.0 pong")
        assert client.noop()[0] == 250  # the session goes on as usual


def test_the_plugin_adds_a_mail_parameter_with_its_syntax(xping_server):
    with xping_server.smtp(timeout=10) as client:
        client.ehlo()
        refused = client.sendmail("a@client.test", ["bob@example.test"], MESSAGE, mail_options=["XPRIO=5"])
        assert refused == {}
        code, text = client.mail("a@client.test", ["XPRIO=high"])  # not its declared syntax
        assert (code, text) == (501, b"5.5.4 Syntax error in parameters or arguments")
        code, _ = client.mail("a@client.test", ["XNOSUCH=1"])  # declared by nobody
        assert code == 555
    [message] = maildir_messages(xping_server.maildir).values()
    assert b"\r\nX-Prio: 5\r\n" in message


def test_without_the_plugin_the_core_refuses_them(make_server):
    server = make_server(DEFAULT_PLUGINS, plugin_dirs=PLUGIN_DIR)
    with server.smtp(timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("xping")
        assert client.docmd("XPING")[0] == 500
        assert client.mail("a@client.test", ["XPRIO=5"])[0] == 555
