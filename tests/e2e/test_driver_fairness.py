"""A client that pipelines without end does not keep the worker for itself.

Reading a socket that has input waiting, and writing to one whose buffer has room, return
at once without giving the other greenlets a turn: a client that keeps the server's input
full (its replies drained as fast) would hold the worker until its input ends. The
conversation asks its driver for a pause of no time (the others' turn) every
``EVENTS_PER_TURN`` events it handles at once. Measured without
timing: a ticker greenlet counts its turns, and a plugin verb answers the count it sees; a
client pipelines 20,000 of them at once, so a server that never yields answers them all
with the same few counts.
"""

from __future__ import annotations

import importlib
import socket
import sys

import gevent

from qpgevent.engine.conversation import EVENTS_PER_TURN
from qpgevent.testing import DEFAULT_PLUGINS

COMMANDS = 20_000
XTICK = '''
"""xtick: answers XTICK with the ticks counted so far by the test's ticker greenlet."""
import fairness_ticker
from qpgevent.plugin import DECLINED, OK, Plugin


class Xtick(Plugin):
    verbs = ("XTICK",)

    def hook_command(self, session, verb, argument):
        if verb != "XTICK":
            return DECLINED
        return OK, str(fairness_ticker.ticks)
'''


def test_a_pipelining_client_lets_the_others_run(make_server, tmp_path):
    (tmp_path / "fairness_ticker.py").write_text("ticks = 0\n", encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        ticker_module = importlib.import_module("fairness_ticker")
        (tmp_path / "plugins").mkdir()
        (tmp_path / "plugins" / "xtick.py").write_text(XTICK, encoding="utf-8")
        server = make_server("[[xtick]]\n" + DEFAULT_PLUGINS)

        def tick():
            while True:
                ticker_module.ticks += 1
                gevent.sleep(0)
        ticker = gevent.spawn(tick)
        try:
            answers = pipeline(server.port)
        finally:
            ticker.kill()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fairness_ticker", None)
    assert len(answers) == COMMANDS
    # A turn for the others every EVENTS_PER_TURN commands (a server that never yields
    # answers with one or two counts; the bound leaves room for turns the ticker missed).
    assert len(set(answers)) >= COMMANDS // EVENTS_PER_TURN // 2, len(set(answers))


def pipeline(port: int) -> list[bytes]:
    """Send COMMANDS XTICKs in one write after EHLO; the counts the replies carry."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sender = gevent.spawn(sock.sendall, b"XTICK\r\n" * COMMANDS)
        answers = []
        for _ in range(COMMANDS):
            line = reader.readline()
            assert line.startswith(b"250 "), line
            answers.append(line[4:].strip())
        sender.get(timeout=60)
        return answers
