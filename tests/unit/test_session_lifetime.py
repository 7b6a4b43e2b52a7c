"""A session is freed the moment its conversation ends, by reference counting alone.

The conversation holds its session and the session its conversation (``Session.respond``
and friends speak through it): a cycle, which ``Conversation.end`` breaks. Without that,
every object of a connection would wait for the cyclic garbage collector, which a worker
runs seldom (qpgevent.server.worker). The references are strong, not weak, because the
compiled build's ``Conversation`` (a mypyc class) cannot be weakly referenced; these tests
run against both builds (tests/unit/test_compiled.py says which one this run imports).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from qpgevent.config import load
from qpgevent.connection import Connection
from qpgevent.engine.conversation import Conversation
from qpgevent.engine.hooks import HookRunner
from qpgevent.engine.loader import load_plugins
from qpgevent.engine.memory import InMemory
from qpgevent.testing import write_ini

MESSAGE = (b"EHLO client.test\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
           b"Subject: hi\r\n\r\nhello\r\n.\r\n")


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic collector off: what is freed here, reference counting freed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def talk(tmp_path) -> tuple[Conversation, InMemory]:
    settings = load(str(write_ini(tmp_path, "[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n")))
    runner = HookRunner(load_plugins(settings), settings.plugin_timeout)
    conversation = Conversation(Connection("127.0.0.1", 40000, "127.0.0.1", 25), runner, settings)
    peer = InMemory(conversation)
    peer.open()
    return conversation, peer


def test_a_session_that_ended_is_freed_without_the_collector(tmp_path, no_collector):
    conversation, peer = talk(tmp_path)
    peer.send(MESSAGE + b"QUIT\r\n")
    assert peer.closed and b"250 2.0.0" in peer.read()
    session = weakref.ref(conversation.session)
    logger = weakref.ref(conversation.session.log)
    del conversation, peer
    assert session() is None and logger() is None


def test_a_session_not_ended_is_held_by_its_cycle_until_the_conversation_ends(tmp_path, no_collector):
    """The cycle is there while the dialogue goes on (so what breaks it is ``end``, tested)."""
    conversation, peer = talk(tmp_path)
    peer.send(MESSAGE)
    session = weakref.ref(conversation.session)
    del peer
    conversation.end()
    del conversation
    assert session() is None


def test_a_session_speaks_through_its_conversation_until_the_end(tmp_path):
    conversation, peer = talk(tmp_path)
    session = conversation.session
    session.respond(250, "said by a plugin")
    assert conversation.out.endswith(b"250 said by a plugin\r\n")
    assert session.status()["state"] == conversation.protocol.state.value
    peer.send(b"QUIT\r\n")
    assert peer.closed
    with pytest.raises(RuntimeError, match="conversation is over"):
        session.respond(250, "too late")
