"""HELP, VRFY and EXPN from a real client (smtplib's help(), verify(), expn()) over a socket.

The real server (in process) with the test plugin ``tests/data/plugins/directory_lists.py``
and the bundled ``etrn``; without them, the core's defaults. The in-memory tests:
``tests/plugins/test_help_verbs.py``.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from qpgevent.testing import DEFAULT_PLUGINS

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")


@pytest.fixture
def lists_server(make_server):
    return make_server("[[directory_lists]]\n[[etrn]]\n" + DEFAULT_PLUGINS, plugin_dirs=PLUGIN_DIR)


def test_help_lists_the_verbs_and_explains_one(lists_server):
    with lists_server.smtp(timeout=10) as client:
        client.ehlo()
        listing = client.help().decode()
        for verb in ("MAIL", "RCPT", "VRFY", "EXPN", "ETRN", "XLISTS"):
            assert verb in listing.split(), verb
        assert client.help("etrn").decode().startswith("2.0.0 ETRN <node>")
        assert client.docmd("HELP", "XYZZY")[0] == 504
        assert client.docmd("ETRN", "example.org")[0] == 458


def test_vrfy_and_expn_answered_by_the_plugin(lists_server):
    with lists_server.smtp(timeout=10) as client:
        client.ehlo()
        assert client.verify("bob") == (250, b"2.1.5 Bob Example <bob@example.test>")
        assert client.verify("nobody")[0] == 550
        assert client.verify("carol")[0] == 252
        assert client.expn("staff") == (250, b"2.1.5 Alice Example <alice@example.test>\n"
                                             b"2.1.5 Bob Example <bob@example.test>")
        assert client.expn("nobody")[0] == 550


def test_without_plugins_the_core_defaults(make_server):
    server = make_server(DEFAULT_PLUGINS, plugin_dirs=PLUGIN_DIR)
    with server.smtp(timeout=10) as client:
        client.ehlo()
        assert "EXPN" not in client.help().decode().split()
        assert client.verify("bob")[0] == 252
        assert client.expn("staff") == (502, b"5.5.1 EXPN not supported")
        assert client.docmd("ETRN", "example.org") == (500, b"5.5.1 Unrecognized command")
        assert client.noop()[0] == 250
